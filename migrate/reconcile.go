package migrate

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/hypervisor"
)

// Reconcile finishes or undoes every open transaction after a restart.
// With a fleet registry, one read of the transaction's VMs decides first
// (reconcile_registry.go). For each VM it asks this host's hypervisor and
// the peer where the VM runs:
//
//   - source, VM runs here: abort (the source keeps its key);
//   - source, VM runs on the peer: commit (the destination promotes its
//     PENDING key; then the source shreds its copy);
//   - destination, the source's ledger is final: follow it;
//   - destination, the source is unreachable and the VM runs here: commit
//     (the VM needs its key here; the source's copy is shredded when it
//     reconciles);
//   - anything else waits (ErrUnresolved): the VM keeps running where it
//     runs, with its key, and a later Reconcile decides.
//
// Transactions this node is driving right now (a Migrate in progress) are
// skipped: mid-migration the VM still runs on the source, and aborting
// then would race the hypervisor. So is every source transaction while
// the hypervisor reports an outgoing migration job for one of its VMs (a
// job can outlive a crashed vtpmd), and a pulled one (hook mode) while its
// lease runs.
func (n *Node) Reconcile(ctx context.Context) error {
	n.recoverMu.Lock()
	defer n.recoverMu.Unlock()
	txs, err := n.cfg.Ledger.OpenTxs()
	if err != nil {
		return err
	}
	var errs []error
	for _, tx := range txs {
		if n.driving(tx.ID) {
			continue // in flight in this process: its own code path finishes it
		}
		if n.leased(ctx, tx) {
			continue // the hypervisor is still migrating (or a pull's lease runs)
		}
		var err error
		if tx.Role == RoleSource {
			err = n.recoverSource(ctx, tx)
		} else {
			err = n.recoverDest(ctx, tx)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("recover %s (%s, %s): %w", tx.ID, tx.Role, tx.State, err))
		}
	}
	return errors.Join(errs...)
}

func (n *Node) runsHere(ctx context.Context, vm string) (bool, error) {
	d, err := n.cfg.Hypervisor.Domain(ctx, vm)
	if err != nil {
		return false, err
	}
	return d.State == hypervisor.StateRunning, nil
}

// landedHere reports whether a destination transaction's VM arrived: it
// runs here, or, for a key-only move (reunite.go), its domain is here.
func (n *Node) landedHere(ctx context.Context, tx Tx, vm string) (bool, error) {
	d, err := n.cfg.Hypervisor.Domain(ctx, vm)
	if err != nil {
		return false, err
	}
	return d.State == hypervisor.StateRunning || (tx.KeyOnly && d.State != hypervisor.StateAbsent), nil
}

func (n *Node) recoverSource(ctx context.Context, tx Tx) error {
	ids := make([]string, 0, len(tx.VMs))
	for _, vm := range tx.VMs {
		ids = append(ids, vm.UUID)
	}
	var (
		peer Peer
		st   *StatusResponse
	)
	peer, err := n.cfg.Dial(ctx, tx.Peer)
	if err == nil {
		st, err = peer.Status(ctx, &StatusRequest{TxID: tx.ID, VMs: ids, From: n.cfg.Host})
	}
	peerErr := err
	// Ask the hypervisor before the ledger transaction: no hypervisor I/O
	// while the ledger's write lock is held.
	here := make(map[string]bool, len(ids))
	gone := make(map[string]bool, len(ids)) // the domain is not defined here any more
	for _, id := range ids {
		d, err := n.cfg.Hypervisor.Domain(ctx, id)
		if err != nil {
			return err
		}
		here[id], gone[id] = d.State == hypervisor.StateRunning, d.State == hypervisor.StateAbsent
	}
	if n.cfg.Registry != nil {
		return n.recoverSourceRegistry(ctx, tx, peer, st, peerErr, here, gone)
	}
	// Every VM apart is aborted below (the destination never recorded
	// the transaction): recorded first, so that a crash in between
	// leaves the record and the open transaction, and recovery redoes both.
	var apart []string
	for _, id := range ids {
		if apartAt(id, gone[id], st, peerErr) {
			apart = append(apart, id)
		}
	}
	if err := n.markApart(tx, apart); err != nil {
		return err
	}
	allHere := true
	tx, err = n.cfg.Ledger.Update(tx.ID, func(t *Tx) error {
		for i := range t.VMs {
			id := t.VMs[i].UUID
			switch why := neverLeft(*t, id, gone[id], st, peerErr); {
			case here[id]:
				t.VMs[i].Outcome, t.VMs[i].Error = OutcomeFailed, "recovered: VM runs on the source"
			case st != nil && slices.Contains(st.Running, id):
				t.VMs[i].Outcome, allHere = OutcomeMigrated, false
			case why != "":
				t.VMs[i].Outcome, t.VMs[i].Error = OutcomeFailed, "recovered: "+why
			case leftWith(*t, id, gone[id], st, peerErr):
				// Left with the hypervisor's migration (the domain is gone
				// here) and the destination recorded the transaction: its
				// domain and state are there; commit (see recoverSourceRegistry).
				t.VMs[i].Outcome, allHere = OutcomeMigrated, false
			case apartAt(id, gone[id], st, peerErr):
				t.VMs[i].Outcome, t.VMs[i].Error = OutcomeFailed, "recovered: "+apartWhy(t.Peer)
			case st != nil && !st.Known:
				// Runs nowhere, and the destination never recorded the
				// transaction (no Prepare reached it): the key stays here.
				t.VMs[i].Outcome, t.VMs[i].Error = OutcomeFailed, "recovered: VM runs nowhere; the destination never recorded the transaction"
			default:
				allHere = false
				return fmt.Errorf("%w: VM %s runs neither here nor (as far as %s says) there: %v", ErrUnresolved, id, t.Peer, peerErr)
			}
		}
		t.State = SrcMigrated
		return nil
	})
	if err != nil {
		return err
	}
	if peerErr != nil {
		if allHere {
			// Nothing moved: the source keeps every key. The destination
			// drops its PENDING keys when it asks us (Status: aborted).
			return n.completeSource(ctx, tx)
		}
		return fmt.Errorf("%w: %s unreachable: %v", ErrUnresolved, tx.Peer, peerErr)
	}
	if !st.Known {
		// The destination never recorded the transaction: nothing to undo there.
		return n.completeSource(ctx, tx)
	}
	return n.finishSource(ctx, peer, tx)
}

func (n *Node) recoverDest(ctx context.Context, tx Tx) error {
	if n.cfg.Registry != nil {
		if handled, err := n.recoverDestRegistry(ctx, tx); handled {
			return err
		}
	}
	ids := make([]string, 0, len(tx.VMs))
	for _, vm := range tx.VMs {
		ids = append(ids, vm.UUID)
	}
	var st *StatusResponse
	peer, err := n.cfg.Dial(ctx, tx.Peer)
	if err == nil {
		st, err = peer.Status(ctx, &StatusRequest{TxID: tx.ID, VMs: ids, From: n.cfg.Host})
	}
	if err == nil {
		switch {
		case !st.Known || st.State == SrcAborted:
			_, err := n.finishDest(ctx, tx, nil, ids)
			return err
		case st.State == SrcCommitted:
			// The source shredded the keys of the VMs that moved; those run
			// here (a key-only move's: are defined here).
			var commit, abort []string
			for _, id := range ids {
				if here, _ := n.landedHere(ctx, tx, id); here {
					commit = append(commit, id)
				} else {
					abort = append(abort, id)
				}
			}
			_, err := n.finishDest(ctx, tx, commit, abort)
			return err
		}
		// The source is alive and mid-transaction: it drives Finish.
		return fmt.Errorf("%w: source %s is %s and will finish it", ErrUnresolved, tx.Peer, st.State)
	}
	var commit []string
	for _, id := range ids {
		if here, _ := n.runsHere(ctx, id); here {
			commit = append(commit, id)
		}
	}
	if len(commit) == len(ids) {
		_, err := n.finishDest(ctx, tx, commit, nil)
		return err
	}
	return fmt.Errorf("%w: source %s unreachable (%v) and not every VM runs here", ErrUnresolved, tx.Peer, err)
}

// Recover runs recovery for one open transaction now, even while its
// driver holds it (Hold): an evacuation whose batch the destination left
// open (it died, or stopped answering, before it confirmed the end) settles
// it before re-planning the batch's VMs. The rules are Reconcile's; a
// transaction whose VMs still have an outgoing hypervisor job is left
// alone. It returns the transaction as the ledger holds it afterwards
// (final when recovery could decide), and recovery's error.
func (n *Node) Recover(ctx context.Context, txID string) (Tx, error) {
	n.recoverMu.Lock()
	defer n.recoverMu.Unlock()
	tx, err := n.cfg.Ledger.Get(txID)
	if err != nil || tx.State.Final() {
		return tx, err
	}
	if n.leased(ctx, tx) {
		return tx, fmt.Errorf("recover %s: %w: the hypervisor still migrates one of its VMs", txID, ErrUnresolved)
	}
	if tx.Role == RoleSource {
		err = n.recoverSource(ctx, tx)
	} else {
		err = n.recoverDest(ctx, tx)
	}
	if err != nil {
		err = fmt.Errorf("recover %s (%s, %s): %w", tx.ID, tx.Role, tx.State, err)
	}
	cur, gerr := n.cfg.Ledger.Get(txID)
	if gerr != nil {
		return tx, errors.Join(err, gerr)
	}
	return cur, err
}

// neverLeft says why a source transaction's VM, which does not run on
// the destination (nor here: the callers ask that first), never left with
// it, or "" when it may have. Recovery then aborts, keeping the key here,
// whatever the destination recorded; before, source and destination each
// waited for the other for ever.
//   - src-begun: the release never finished (release.go persists
//     src-prepared before the hypervisor may move the VM, and a pull
//     answers the destination's hook only after it), so the destination
//     holds at most a PENDING key, which never starts (soak seed 5003).
//   - src-prepared, the domain still defined here, and the destination,
//     asked, holds the transaction, but this host never confirmed the
//     migration to it (Tx.Confirmed): the destination's start gate
//     (AdmitIncoming) admits a PENDING key only after that confirmation,
//     so the VM never ran there (soak seeds 6008, 7027). Once confirmed,
//     the VM may have run there and died with newer state: wait.
//   - a key-only move (reunite.go) whose VM's domain the destination,
//     asked, does not hold: the key has nothing to join there.
func neverLeft(tx Tx, id string, gone bool, st *StatusResponse, peerErr error) string {
	switch {
	case tx.State == SrcBegun:
		return "the key was never released (src-begun); the VM never left"
	case tx.State == SrcPrepared && !tx.Confirmed && !gone && peerErr == nil && st != nil && st.Known:
		return "VM runs nowhere; this host never confirmed its migration, so it never ran on the destination"
	case tx.KeyOnly && peerErr == nil && st != nil && st.Known && !domainThere(id, st):
		return "a key-only move, and the destination does not hold the VM's domain"
	}
	return ""
}

// domainThere reports whether the destination's answer shows the VM's
// domain there, running or not.
func domainThere(id string, st *StatusResponse) bool {
	return slices.Contains(st.Running, id) || slices.Contains(st.Stopped, id)
}

// leftWith reports whether a VM that runs nowhere left with tx: its domain
// is gone here (a persistent source domain is undefined only when its
// migration succeeded, and a key-only move's never was here) and the
// destination recorded tx, so its PENDING key and the VM's state are
// there (for a key-only move: and its domain).
func leftWith(tx Tx, id string, gone bool, st *StatusResponse, peerErr error) bool {
	return gone && peerErr == nil && st != nil && st.Known && (!tx.KeyOnly || domainThere(id, st))
}

// apartAt reports whether the VM's domain left with the hypervisor's
// migration (gone here) and the destination holds it, shut off, but has no
// record of the transaction: it lost its ledger and key store (a TPM
// replaced) before it committed (soak seed 6014). The key stays here,
// the only copy left, and Reunite moves it there.
func apartAt(id string, gone bool, st *StatusResponse, peerErr error) bool {
	return gone && peerErr == nil && st != nil && !st.Known && slices.Contains(st.Stopped, id)
}

func apartWhy(peer string) string {
	return fmt.Sprintf("the VM's domain and vTPM state are on %s, which has no record of the transaction (it lost its ledger, with its TPM?); the key stays here and moves there once %s is attested (reunite)", peer, peer)
}

// markApart records the VMs of tx that recovery aborts while apartAt
// (before it aborts them).
func (n *Node) markApart(tx Tx, apart []string) error {
	for _, id := range apart {
		if err := n.cfg.Ledger.MarkApart(Apart{VM: id, Host: tx.Peer, Tx: tx.ID}); err != nil {
			return fmt.Errorf("recover %s: record VM %s apart: %w", tx.ID, id, err)
		}
		n.log.WithFields(logrus.Fields{"tx": tx.ID, "vm": id, "dest": tx.Peer}).Warn("recovery: " + apartWhy(tx.Peer))
	}
	return nil
}
