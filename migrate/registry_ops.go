package migrate

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vtpmm/vtpmm/migrate/registry"
)

// The fleet registry's part of a migration (Config.Registry; nil is
// registry mode none). The source opens the batch (Begin) after its
// ledger's Begin and before it dials the destination, commits it (Commit)
// after the hypervisor moved the VMs and before Finish, and aborts it
// (Abort) when the migration fails before the hypervisor's part. The
// generation is the fencing token: every change compares each VM's exact
// record. docs/protocol.md, "Registry".

// registryError adds migrate's class to an error of the registry, so that
// the admin API and vtpmctl classify it (exit codes), and keeps the
// registry's own sentinel (and its rule) in the chain.
func registryError(err error) error {
	if err == nil {
		return nil
	}
	var classes []error
	switch {
	case errors.Is(err, registry.ErrNoQuorum), errors.Is(err, registry.ErrClosed),
		errors.Is(err, registry.ErrTLS), errors.Is(err, registry.ErrPermission),
		errors.Is(err, context.DeadlineExceeded):
		classes = append(classes, ErrRegistryUnavailable)
	default:
		if errors.Is(err, registry.ErrWrongOwner) || errors.Is(err, registry.ErrStaleGeneration) {
			classes = append(classes, ErrNotOwner)
		}
		if errors.Is(err, registry.ErrBusy) {
			classes = append(classes, ErrBusy) // another transaction holds the VM: exit 5, as in mode none
		}
		if len(classes) == 0 || !onlyBusy(err) {
			classes = append(classes, ErrRegistryRefused)
		}
	}
	for _, c := range classes {
		err = fmt.Errorf("%w: %w", c, err)
	}
	return err
}

// onlyBusy reports whether err is a refusal for an open transaction only.
func onlyBusy(err error) bool {
	for _, other := range []error{registry.ErrWrongOwner, registry.ErrStaleGeneration, registry.ErrGenerationBounds,
		registry.ErrHostFenced, registry.ErrHostNotActive, registry.ErrNotEnrolled, registry.ErrNotFound, registry.ErrExists,
		registry.ErrConflict, registry.ErrBatchTooLarge, registry.ErrBadRecord, registry.ErrHostLive} {
		if errors.Is(err, other) {
			return false
		}
	}
	return errors.Is(err, registry.ErrBusy)
}

// unavailable reports whether a registry error means "no quorum" rather
// than a refusal.
func unavailable(err error) bool { return errors.Is(err, ErrRegistryUnavailable) }

// batch is the registry's view of VMs of tx moving from this host to the
// transaction's peer: each at the generation the source holds now (one
// below the one the destination will hold).
func (n *Node) batch(tx Tx, vms []TxVM) registry.Batch {
	b := registry.Batch{TxID: tx.ID, From: n.cfg.Host, To: tx.Peer}
	for _, vm := range vms {
		b.VMs = append(b.VMs, registry.VMGen{ID: vm.UUID, Generation: vm.Generation - 1})
	}
	return b
}

// regBegin opens tx in the registry: registry round trip 1.
func (n *Node) regBegin(ctx context.Context, tx Tx) error {
	_, err := n.cfg.Registry.Begin(ctx, n.batch(tx, tx.VMs))
	if errors.Is(err, registry.ErrNotFound) {
		// A VM this host holds that the registry does not know (created
		// while the registry was down, or a restore older than the VM):
		// record it (the restore rule, ownership.go) and begin again.
		if aerr := n.adopt(ctx, tx.VMs); aerr != nil {
			return registryError(errors.Join(err, aerr))
		}
		_, err = n.cfg.Registry.Begin(ctx, n.batch(tx, tx.VMs))
	}
	if errors.Is(err, registry.ErrBusy) && n.abortOrphans(ctx, tx) {
		// The registry showed transactions of this host that its ledger
		// closed (an abort that did not reach the registry): closed now.
		_, err = n.cfg.Registry.Begin(ctx, n.batch(tx, tx.VMs))
	}
	return registryError(err)
}

// abortOrphans aborts the registry transactions that the last view (the
// refused Begin read the records) shows open on tx's VMs from this host
// but that no open transaction of its ledger holds. It reports whether it
// aborted any.
func (n *Node) abortOrphans(ctx context.Context, tx Tx) bool {
	view := n.cfg.Registry.Cached(vmIDs(tx.VMs)...)
	orphans := map[registry.OpenTx][]registry.VMGen{}
	for _, vm := range tx.VMs {
		r, ok := view.VMs[vm.UUID]
		if !ok || r.Tx == nil || r.Owner != n.cfg.Host || r.Generation != vm.Generation-1 || r.Tx.ID == tx.ID || n.driving(r.Tx.ID) {
			continue
		}
		if old, err := n.cfg.Ledger.Get(r.Tx.ID); err == nil && !old.State.Final() {
			continue // a live transaction of this host: busy indeed
		}
		orphans[*r.Tx] = append(orphans[*r.Tx], registry.VMGen{ID: vm.UUID, Generation: r.Generation})
	}
	aborted := false
	for otx, vms := range orphans {
		if _, err := n.cfg.Registry.Abort(ctx, registry.Batch{TxID: otx.ID, From: n.cfg.Host, To: otx.To, VMs: vms}); err != nil {
			n.log.WithError(err).WithField("tx", otx.ID).Warn("aborting an orphan registry transaction")
			continue
		}
		aborted = true
	}
	return aborted
}

// regCommit commits the VMs of tx that moved (registry round trip 2, the
// commit point) and aborts the others (failure path only). A commit that
// fails leaves the transaction open for Reconcile, which sends the same
// Commit again (CAS makes that safe even when the first one took effect).
// A failed abort is only logged: it unblocks later migrations and
// SyncOwnership finishes it.
func (n *Node) regCommit(ctx context.Context, tx Tx) error {
	var moved, failed []TxVM
	for _, vm := range tx.VMs {
		if vm.Outcome == OutcomeMigrated {
			moved = append(moved, vm)
		} else {
			failed = append(failed, vm)
		}
	}
	if len(moved) > 0 {
		if _, err := n.cfg.Registry.Commit(ctx, n.batch(tx, moved)); err != nil {
			return fmt.Errorf("migrate %s: registry commit: %w: %w", tx.ID, ErrUnresolved, registryError(err))
		}
	}
	if len(failed) > 0 {
		n.regAbort(ctx, tx, failed)
	}
	return nil
}

// regAbort closes the registry's transaction of the VMs (ownership and
// generation stay). Best effort: SyncOwnership aborts a registry
// transaction that no open ledger transaction holds.
func (n *Node) regAbort(ctx context.Context, tx Tx, vms []TxVM) {
	if n.cfg.Registry == nil || len(vms) == 0 {
		return
	}
	if _, err := n.cfg.Registry.Abort(ctx, n.batch(tx, vms)); err != nil {
		n.log.WithError(err).WithField("tx", tx.ID).Warn("registry abort failed; the owner's ownership sync retries it")
	}
}

// registryRev is the revision of this host's last view of the VMs: a
// destination waits for its own view to reach it before it reads.
func (n *Node) registryRev(ids []string) int64 {
	if n.cfg.Registry == nil {
		return 0
	}
	return n.cfg.Registry.Cached(ids...).Rev
}

// revWaiter is implemented by registries whose last view follows other
// hosts' changes (registry.Client): WaitRev waits until the view has
// reached rev.
type revWaiter interface {
	WaitRev(ctx context.Context, rev int64) error
}

// cacheWait bounds how long a host waits for its last view to reach a
// revision a peer named before it reads the registry instead.
const cacheWait = 250 * time.Millisecond

// registryView reads the VMs' records. When rev > 0 (a revision the peer
// named: its change) and this host's last view reaches it within cacheWait
// and satisfies ok, that view serves (no round trip); otherwise one read.
// When the registry is unavailable it returns the last view (Stale) with
// the error.
func (n *Node) registryView(ctx context.Context, ids []string, rev int64, ok func(registry.View) bool) (registry.View, error) {
	reg := n.cfg.Registry
	if rev > 0 && ok != nil {
		if w, can := reg.(revWaiter); can {
			wctx, cancel := context.WithTimeout(ctx, cacheWait)
			err := w.WaitRev(wctx, rev)
			cancel()
			if v := reg.Cached(ids...); err == nil && v.Rev >= rev && ok(v) {
				return v, nil
			}
		}
	}
	v, err := reg.VMs(ctx, ids...)
	if err != nil {
		err = registryError(err)
		if unavailable(err) {
			return reg.Cached(ids...), err
		}
		return registry.View{}, err
	}
	return v, nil
}
