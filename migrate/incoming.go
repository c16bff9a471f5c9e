package migrate

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"
)

// The start gate of an incoming migration (model findings F1, F3). A
// PENDING key serves only the hypervisor job its transaction started,
// never a cold start:
//
//   - at "migrate begin" (RequestPull) a PENDING key already here is
//     reused only if its transaction's source confirms (Pull with Tx) that
//     its hypervisor migrates the VM here for that transaction now;
//     otherwise the stale transaction is settled first (or the pull is
//     refused while it stays open);
//   - RequestPull marks the VMs (arm) for the "prepare begin" that
//     follows; AdmitIncoming consumes the mark and asks the source to
//     confirm again. A "prepare begin" without both (a cold start from a
//     PENDING key, or one after the migration failed) is refused, and
//     CheckStart refuses a start while the transaction is open (rule
//     open-transaction).
//
// vtpmd never asks its own hypervisor on this path (libvirt waits on the
// hook); it asks the source's vtpmd, which asks its own hypervisor, as a
// Pull does.

// RuleIncomingJob names the refusal of a PENDING key that no incoming
// migration of its transaction uses.
const RuleIncomingJob = "incoming-job"

// IncomingWindow bounds the time from "migrate begin" (RequestPull) to the
// "prepare begin" that uses its PENDING key; libvirt runs them back to back.
const IncomingWindow = 2 * time.Minute

type incomingArm struct {
	tx    string
	until time.Time
}

// arm marks VMs (VM -> its PENDING transaction) for the "prepare begin" of
// their incoming migration.
func (n *Node) arm(vms map[string]Tx) {
	n.armMu.Lock()
	defer n.armMu.Unlock()
	until := n.cfg.Now().Add(IncomingWindow)
	for id, tx := range vms {
		n.armed[id] = incomingArm{tx: tx.ID, until: until}
	}
}

// disarm consumes the VM's mark and reports whether it named txID and was
// still valid.
func (n *Node) disarm(vm, txID string) bool {
	n.armMu.Lock()
	defer n.armMu.Unlock()
	a, ok := n.armed[vm]
	delete(n.armed, vm)
	return ok && a.tx == txID && n.cfg.Now().Before(a.until)
}

// AdmitIncoming is the hook's "prepare begin" for a VM whose key may be
// PENDING here. ok is false with no error when no open incoming
// transaction holds the VM (a start: CheckStart decides). It admits the
// PENDING key (ok) only for the incoming migration whose "migrate begin"
// pulled or confirmed it on this node (RequestPull, within
// IncomingWindow, once) and whose source confirms now that its
// hypervisor migrates the VM here for that transaction. Otherwise it
// refuses, wrapping ErrNotOwner (rule incoming-job).
func (n *Node) AdmitIncoming(ctx context.Context, vm string) (Tx, bool, error) {
	tx, ok := n.Incoming(vm)
	if !ok {
		return Tx{}, false, nil
	}
	if !n.disarm(vm, tx.ID) {
		return tx, false, fmt.Errorf("start %s: %w: its key is PENDING here for transaction %s from %s, and no incoming migration of that transaction began on %s (a cold start from a PENDING key is never admitted; rule %s)",
			vm, ErrNotOwner, tx.ID, tx.Peer, n.cfg.Host, RuleIncomingJob)
	}
	if err := n.confirmIncoming(ctx, tx, []string{vm}); err != nil {
		return tx, false, fmt.Errorf("start %s: %w: %w (rule %s)", vm, ErrNotOwner, err, RuleIncomingJob)
	}
	return tx, true, nil
}

// confirmIncoming asks tx's source whether its hypervisor migrates vms
// here for tx right now.
func (n *Node) confirmIncoming(ctx context.Context, tx Tx, vms []string) error {
	peer, err := n.cfg.Dial(ctx, tx.Peer)
	if err == nil {
		_, err = peer.Pull(ctx, &PullRequest{Version: ProtocolVersion, Dest: n.cfg.Host, VMs: vms, Tx: tx.ID})
	}
	if err != nil {
		return fmt.Errorf("the source %s does not confirm that transaction %s's migration is running: %w", tx.Peer, tx.ID, err)
	}
	return nil
}

// confirmPull answers a confirmation (PullRequest.Tx) on the source: each
// VM is held by the open transaction req.Tx with req.Dest, prepared, and
// this host's hypervisor migrates it away (to req.Dest where it names the
// destination). Nothing is released. Before it answers, it marks the
// transaction Confirmed in the ledger: from then on the destination may
// run the VMs on their PENDING keys (AdmitIncoming asks this), so this
// host's recovery never aborts it on the destination's word that the VMs
// do not run there (they may have, and died with newer state).
func (n *Node) confirmPull(ctx context.Context, req *PullRequest) (*PullResponse, error) {
	confirmed := false // the ledger already says so: no second write
	for _, id := range req.VMs {
		txID, err := n.cfg.Ledger.Holder(id)
		if err != nil || txID != req.Tx {
			return nil, fmt.Errorf("confirm %s for %s: %w: transaction %s does not hold it on %s", id, req.Dest, ErrNotMigrating, req.Tx, n.cfg.Host)
		}
		tx, err := n.cfg.Ledger.Get(txID)
		if err != nil {
			return nil, fmt.Errorf("confirm %s: %w", id, err)
		}
		if tx.Role != RoleSource || tx.Peer != req.Dest || tx.State != SrcPrepared {
			return nil, fmt.Errorf("confirm %s for %s: %w: transaction %s is %s %s with %s", id, req.Dest, ErrNotMigrating, txID, tx.Role, tx.State, tx.Peer)
		}
		confirmed = tx.Confirmed
		job, err := n.outgoingJob(ctx, id)
		if err != nil {
			return nil, fmt.Errorf("confirm %s: %w", id, err)
		}
		if !job.Active {
			return nil, fmt.Errorf("confirm %s for %s: %w: no outgoing migration job on %s", id, req.Dest, ErrNotMigrating, n.cfg.Host)
		}
		if job.Dest != "" && job.Dest != req.Dest {
			return nil, fmt.Errorf("confirm %s for %s: %w: the hypervisor on %s migrates it to %s", id, req.Dest, ErrNotMigrating, n.cfg.Host, job.Dest)
		}
	}
	if !confirmed {
		if _, err := n.cfg.Ledger.Update(req.Tx, func(t *Tx) error {
			if t.State != SrcPrepared {
				return fmt.Errorf("%w: transaction %s is %s", ErrNotMigrating, t.ID, t.State)
			}
			t.Confirmed = true
			return nil
		}); err != nil {
			return nil, fmt.Errorf("confirm %s for %s: %w", req.Tx, req.Dest, err)
		}
	}
	return &PullResponse{TxID: req.Tx, Owner: n.cfg.Host, VMs: req.VMs}, nil
}

// pendingForJob splits vms into those whose PENDING key here serves the
// job now migrating them (confirmed by the source, grouped by
// transaction) and the missing ones, to pull. A PENDING key its source
// does not confirm belongs to another (aborted, stale) transaction: it is
// settled first (Settle) and, once gone, the VM is pulled afresh; while
// it stays, the pull is refused (ErrBusy).
func (n *Node) pendingForJob(ctx context.Context, vms []string) ([]string, map[string]Tx, error) {
	var missing []string
	groups := map[string][]string{}
	txs := map[string]Tx{}
	for _, id := range vms {
		tx, ok := n.Incoming(id)
		if !ok {
			missing = append(missing, id)
			continue
		}
		groups[tx.ID] = append(groups[tx.ID], id)
		txs[tx.ID] = tx
	}
	ids := make([]string, 0, len(groups))
	for id := range groups {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	confirmed := map[string]Tx{}
	for _, txID := range ids {
		tx, group := txs[txID], groups[txID]
		cerr := n.confirmIncoming(ctx, tx, group)
		if cerr == nil {
			for _, id := range group {
				confirmed[id] = tx
			}
			continue
		}
		var errs []error
		for _, id := range group {
			if err := n.Settle(ctx, id); err != nil {
				errs = append(errs, err)
			}
			if _, still := n.Incoming(id); still {
				return nil, nil, fmt.Errorf("%w: VM %s: its key is PENDING here for transaction %s, which serves no migration now (%w), and is not settled yet (%w): refused until recovery ends it (rule %s)",
					ErrBusy, id, txID, cerr, errors.Join(errs...), RuleIncomingJob)
			}
			missing = append(missing, id)
		}
	}
	return missing, confirmed, nil
}
