package migrate

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/vtpmm/vtpmm/migrate/registry"
)

// Recovery with the fleet registry: one read of the transaction's VMs
// decides what the registry already settled; the hypervisors and the peer
// decide the rest, as in registry mode none, and the registry is changed
// (Commit or Abort, compare-and-swap) before the hosts act on it.
//
// Per VM, as the source sees the registry's record (g: the generation the
// source held; tx: this transaction):
//
//	{peer, g+1}            committed: finish (the destination promotes), then shred here
//	{self, g, tx open}     not committed: the VM runs here -> Abort; runs on the peer -> Commit;
//	                       runs nowhere and the peer never recorded tx -> Abort;
//	                       left with the migration (domain gone here) and the peer recorded tx -> Commit; else wait
//	{self, g}              aborted (or never begun): the VM runs here -> abort; on the peer -> Commit without Begin
//	absent                 the registry is older than the VM (a restore): decide as in mode none; SyncOwnership records it
//	anything else          the registry moved on (a takeover): never commit; the VM keeps running where it runs;
//	                       once the record's generation is past this transaction's (g+1 or above, not the
//	                       committed record) and the VM does not run here, close it keeping the copy:
//	                       SyncOwnership shreds it once the owner confirms (nothing else would: the
//	                       transaction would hold the VM for good)
//
// Without quorum the last view serves: what it shows committed is
// finished; an abort completes locally (SyncOwnership aborts the
// registry's transaction later); a commit waits (fail closed).

// regState is what the registry says about one VM of a transaction.
type regState int

const (
	regCommitted regState = iota // the destination owns it at the new generation
	regOpen                      // the source owns it with this transaction open
	regClosed                    // the source owns it, nothing open
	regAbsent                    // the registry has no record
	regOther                     // another owner or generation: the registry moved on
)

func classify(tx Tx, vm TxVM, src, dst string, v registry.View) (regState, registry.VM) {
	r, ok := v.VMs[vm.UUID]
	switch {
	case !ok:
		return regAbsent, r
	case r.Owner == dst && r.Generation == vm.Generation && r.Tx == nil:
		return regCommitted, r
	case r.Owner == src && r.Generation == vm.Generation-1 && r.Tx != nil && r.Tx.ID == tx.ID && r.Tx.To == dst:
		return regOpen, r
	case r.Owner == src && r.Generation == vm.Generation-1 && r.Tx == nil:
		return regClosed, r
	}
	return regOther, r
}

// classifyRestore is classify for a restore: the registry's owner is the
// host the operator replaces, whoever relayed.
func classifyRestore(tx Tx, vm TxVM, dst string, v registry.View) regState {
	r, ok := v.VMs[vm.UUID]
	switch {
	case !ok:
		return regAbsent
	case r.Owner == dst && r.Generation == vm.Generation && r.Tx == nil:
		return regCommitted
	case r.Generation == vm.Generation-1 && r.Tx != nil && r.Tx.ID == tx.ID && r.Tx.To == dst:
		return regOpen
	}
	return regOther
}

// recoverSourceRegistry is recoverSource with a registry.
func (n *Node) recoverSourceRegistry(ctx context.Context, tx Tx, peer Peer, st *StatusResponse, peerErr error, here, gone map[string]bool) error {
	ids := vmIDs(tx.VMs)
	view, verr := n.registryView(ctx, ids, 0, nil)
	if verr != nil && !view.Stale {
		return fmt.Errorf("%w: %w", ErrUnresolved, verr)
	}
	onPeer := func(id string) bool { return st != nil && slices.Contains(st.Running, id) }
	fenced := 0 // F12: 0 not tried, 1 fenced, -1 not fenced (once per recovery)
	fenceDest := func(id string) bool {
		if fenced == 0 {
			fenced = -1
			if n.fenceGoneDest(ctx, tx, id) {
				fenced = 1
			}
		}
		return fenced == 1
	}
	var commit, commitNoTx, abort []TxVM
	outcome := map[string]Outcome{}
	superseded := map[string]string{} // VM -> why: closed here, the copy kept for SyncOwnership
	var apart []string                // aborted, the domain on the peer: recorded for Reunite
	var errs []error
	for _, vm := range tx.VMs {
		s, r := classify(tx, vm, n.cfg.Host, tx.Peer, view)
		id := vm.UUID
		switch {
		case s == regCommitted && here[id]:
			errs = append(errs, fmt.Errorf("%w: VM %s runs here but the registry shows %s owning it at generation %d", ErrUnresolved, id, r.Owner, r.Generation))
		case s == regCommitted:
			outcome[id] = OutcomeMigrated
		case s == regOther:
			if here[id] {
				outcome[id] = OutcomeFailed // keep the copy; SyncOwnership decides about it
				continue
			}
			if verr == nil && r.Generation >= vm.Generation {
				// The registry moved past this transaction (the destination
				// committed it by itself and the VM moved on, or a
				// takeover): it can neither commit nor abort here any more.
				// Close it keeping this host's copy: SyncOwnership shreds it
				// once the owner confirms over the agent wire.
				outcome[id] = OutcomeFailed
				superseded[id] = fmt.Sprintf("superseded: the registry shows %s at generation %d; the copy is kept until %s confirms it", r.Owner, r.Generation, r.Owner)
				continue
			}
			errs = append(errs, fmt.Errorf("%w: VM %s: the registry shows %s at generation %d: another change superseded transaction %s", ErrUnresolved, id, r.Owner, r.Generation, tx.ID))
		case here[id]:
			outcome[id] = OutcomeFailed
			if s == regOpen {
				abort = append(abort, vm)
			}
		case onPeer(id):
			outcome[id] = OutcomeMigrated
			switch s {
			case regOpen:
				commit = append(commit, vm)
			case regClosed:
				commitNoTx = append(commitNoTx, vm)
			}
		case neverLeft(tx, id, gone[id], st, peerErr) != "":
			outcome[id] = OutcomeFailed
			if s == regOpen {
				abort = append(abort, vm)
			}
		case leftWith(tx, id, gone[id], st, peerErr) && (s == regOpen || s == regClosed):
			// The VM left with the hypervisor's migration (a persistent
			// source domain is undefined only when its migration
			// succeeded) and the destination recorded the transaction
			// (its PENDING key and the VM's state are there), but it runs
			// nowhere now (the destination was powered off): commit, as
			// when it runs there. Aborting would leave this host a key
			// without the VM's domain or state (soak seed 4001).
			outcome[id] = OutcomeMigrated
			if s == regOpen {
				commit = append(commit, vm)
			} else {
				commitNoTx = append(commitNoTx, vm)
			}
		case gone[id] && peerErr != nil:
			// Left with the hypervisor's migration and the destination
			// cannot be asked: wait for it. Never abort (F12 neither):
			// the VM's domain and vTPM state went with it, so this host's
			// key alone would start nothing (or an empty vTPM).
			errs = append(errs, fmt.Errorf("%w: VM %s left this host with the hypervisor's migration (its domain is not defined here) and %s cannot be asked: waiting for it (if it is gone for good, restore the VM from its backup: vtpmctl restore): %v", ErrUnresolved, id, tx.Peer, peerErr))
		case peerErr != nil && s == regOpen && verr == nil && fenceDest(id):
			// F12: the destination is gone with the intent open; fenced, it
			// runs nothing: abort, the VM restarts from this host's key.
			outcome[id] = OutcomeFailed
			abort = append(abort, vm)
		case peerErr == nil && !st.Known:
			// The VM runs nowhere (a host fenced or powered off) and the
			// destination never recorded the transaction: no Prepare
			// reached it, so it holds no key of it and never ran the VM.
			// Abort; the key stays here and the owner may start the VM.
			// Or the VM's domain went there with the hypervisor's
			// migration, and the destination lost its ledger since
			// (apartAt): abort too, keeping the only key left, and record
			// the VM apart for Reunite.
			outcome[id] = OutcomeFailed
			if s == regOpen {
				abort = append(abort, vm)
			}
			if apartAt(id, gone[id], st, peerErr) {
				apart = append(apart, id)
			}
		default:
			errs = append(errs, fmt.Errorf("%w: VM %s runs neither here nor (as far as %s says) there: %v", ErrUnresolved, id, tx.Peer, peerErr))
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if len(commit)+len(commitNoTx) > 0 {
		if verr != nil {
			return fmt.Errorf("%w: the VMs run on %s, and their commit waits for the registry: %w", ErrUnresolved, tx.Peer, verr)
		}
		if len(commit) > 0 {
			if _, err := n.cfg.Registry.Commit(ctx, n.batch(tx, commit)); err != nil {
				return fmt.Errorf("%w: registry commit: %w", ErrUnresolved, registryError(err))
			}
		}
		if len(commitNoTx) > 0 {
			b := n.batch(tx, commitNoTx)
			b.TxID = ""
			if _, err := n.cfg.Registry.Commit(ctx, b); err != nil {
				return fmt.Errorf("%w: registry commit: %w", ErrUnresolved, registryError(err))
			}
		}
	}
	if err := n.markApart(tx, apart); err != nil {
		return err
	}
	if verr == nil {
		n.regAbort(ctx, tx, abort)
	}
	tx, err := n.cfg.Ledger.Update(tx.ID, func(t *Tx) error {
		for i := range t.VMs {
			o := outcome[t.VMs[i].UUID]
			t.VMs[i].Outcome = o
			if o == OutcomeFailed {
				t.VMs[i].Error = "recovered: VM runs on the source"
				if why, ok := superseded[t.VMs[i].UUID]; ok {
					t.VMs[i].Error = "recovered: " + why
				}
				if slices.Contains(apart, t.VMs[i].UUID) {
					t.VMs[i].Error = "recovered: " + apartWhy(t.Peer)
				}
			}
		}
		t.State = SrcMigrated
		return nil
	})
	if err != nil {
		return err
	}
	allHere := true
	for _, vm := range tx.VMs {
		allHere = allHere && vm.Outcome == OutcomeFailed
	}
	switch {
	case peerErr != nil && allHere:
		return n.completeSource(ctx, tx)
	case peerErr != nil:
		return fmt.Errorf("%w: %s unreachable: %v", ErrUnresolved, tx.Peer, peerErr)
	case !st.Known:
		return n.completeSource(ctx, tx)
	}
	return n.finishSource(ctx, peer, tx)
}

// recoverDestRegistry is recoverDest with a registry. Per VM (g: the
// generation this host would hold):
//
//	{self, g}                  committed: promote
//	{source, g-1, tx open}     the source drives; if it is gone and the VM runs here, this host commits (CAS) and promotes
//	{source, g-1} / others     not committed: drop the PENDING key (never while the VM runs here)
//	absent                     decide as in registry mode none
func (n *Node) recoverDestRegistry(ctx context.Context, tx Tx) (bool, error) {
	ids := vmIDs(tx.VMs)
	view, verr := n.registryView(ctx, ids, 0, nil)
	if verr != nil && !view.Stale {
		return true, fmt.Errorf("%w: %w", ErrUnresolved, verr)
	}
	var commit, drop, open []string
	for _, vm := range tx.VMs {
		s, _ := classify(tx, vm, tx.Peer, n.cfg.Host, view)
		if tx.Restore {
			s = classifyRestore(tx, vm, n.cfg.Host, view)
		}
		switch s {
		case regCommitted:
			commit = append(commit, vm.UUID)
		case regOpen:
			open = append(open, vm.UUID)
		case regAbsent:
			if verr == nil {
				return false, nil // the registry does not know these VMs: mode none's rules
			}
			open = append(open, vm.UUID)
		default:
			if verr != nil {
				open = append(open, vm.UUID) // a stale view never drops a key
				continue
			}
			drop = append(drop, vm.UUID)
		}
	}
	if len(open) == 0 {
		_, err := n.finishDest(ctx, tx, commit, drop)
		return true, err
	}
	if tx.Restore {
		// The relay keeps no ledger: the operator's registry transaction
		// alone decides (vtpmctl commits or aborts it).
		return true, fmt.Errorf("%w: the restore is open in the registry; the operator's vtpmctl commits or aborts it", ErrUnresolved)
	}
	// Some VMs are still open in the registry: the source decides (it is
	// alive and drives, or final), or, gone, this host commits the VMs
	// that run here.
	var st *StatusResponse
	peer, err := n.cfg.Dial(ctx, tx.Peer)
	if err == nil {
		st, err = peer.Status(ctx, &StatusRequest{TxID: tx.ID, VMs: ids, From: n.cfg.Host})
	}
	if err == nil {
		switch {
		case !st.Known || st.State == SrcAborted:
			// The source aborted (its registry abort may have failed);
			// the VMs open in the registry are not committed.
			_, err := n.finishDest(ctx, tx, commit, append(drop, open...))
			return true, err
		case st.State == SrcCommitted:
			// A source commits in the registry before it finishes: the
			// open records are stale reads; read again next round.
			return true, fmt.Errorf("%w: source %s committed; the registry read showed it open", ErrUnresolved, tx.Peer)
		}
		return true, fmt.Errorf("%w: source %s is %s and will finish it", ErrUnresolved, tx.Peer, st.State)
	}
	if verr != nil {
		return true, fmt.Errorf("%w: source %s unreachable (%v) and the registry unavailable: %w", ErrUnresolved, tx.Peer, err, verr)
	}
	var mine []TxVM
	for _, vm := range tx.VMs {
		if !slices.Contains(open, vm.UUID) {
			continue
		}
		if here, _ := n.runsHere(ctx, vm.UUID); !here {
			return true, fmt.Errorf("%w: source %s unreachable (%v) and VM %s does not run here", ErrUnresolved, tx.Peer, err, vm.UUID)
		}
		mine = append(mine, vm)
	}
	// The VMs run here and their source is gone: commit them in the
	// registry (CAS against the source's open transaction; if the source
	// comes back and aborts first, this fails and the next round drops
	// nothing that runs here).
	b := registry.Batch{TxID: tx.ID, From: tx.Peer, To: n.cfg.Host}
	for _, vm := range mine {
		b.VMs = append(b.VMs, registry.VMGen{ID: vm.UUID, Generation: vm.Generation - 1})
	}
	if _, cerr := n.cfg.Registry.Commit(ctx, b); cerr != nil {
		return true, fmt.Errorf("%w: registry commit by the destination: %w", ErrUnresolved, registryError(cerr))
	}
	_, ferr := n.finishDest(ctx, tx, append(commit, vmIDs(mine)...), drop)
	return true, ferr
}
