package migrate

import (
	"context"
	"errors"
	"fmt"
	"sort"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/vtpm"
)

// Ownership against the fleet registry, outside migrations: the rule a
// host applies before it starts a VM (CheckStart: libvirt's prepare-begin
// hook, vtpmd's own vTPM starts) and at every vtpmd start and recovery
// tick (SyncOwnership), per VM it holds a key for, at local generation gl
// (its key store's, accepted by its TPM anchor), against the registry's
// record {owner, gr} (docs/registry.md, "A restore older than the hosts"):
//
//	owner = self, gr = gl       agree: start
//	gr > gl                     this copy is stale: refuse, keep it until the owner confirms over the agent wire that it holds gr, then shred it
//	gr < gl, or no record       the registry is older (a restore): raise it (Bump, CAS on the record read), then start
//	gr = gl, another owner      contradiction at the same fencing token: neither starts (rule generation-conflict)
//	owner = self, open tx that no open ledger transaction holds   abort it (restored from before the transaction ended)
//
// Before any of these, CheckStart refuses while an open ledger transaction
// holds the VM (rule open-transaction): on a source the key was released
// (the destination may already run the VM), on a destination it is
// PENDING; an incoming migration's PENDING key is admitted only by the
// hook's IncomingMigration, never by a start.
//
// Without quorum the last view serves, and only "agree" lets a start
// through (a host may start a VM that both its TPM anchor and its last
// view say it owns).

// Rules of a start refusal (the error names one).
const (
	RuleStaleCopy          = "stale-copy"
	RuleGenerationConflict = "generation-conflict"
	RuleRegistryView       = "registry-last-view"
	RuleRegistryPending    = "registry-pending"
	RuleOpenTx             = "open-transaction"
)

// startAction is the decision of the start rule for one VM.
type startAction int

const (
	startAllow    startAction = iota // agree
	startRaise                       // the registry is older: Bump, then allow
	startStale                       // refuse; the copy is stale
	startConflict                    // refuse; the same generation elsewhere
	startPending                     // refuse; the registry shows this host newer (recovery finishes it)
	startUnknown                     // refuse; no quorum and the last view does not confirm
)

// decideStart applies the start rule to one VM. r is nil when the
// registry (or, stale, the last view) has no record.
func decideStart(self string, gl uint64, r *registry.VM, stale bool) startAction {
	switch {
	case r != nil && r.Owner == self && r.Generation == gl:
		return startAllow
	case stale:
		return startUnknown
	case r == nil || r.Generation < gl:
		return startRaise
	case r.Generation == gl:
		return startConflict
	case r.Owner == self:
		return startPending
	}
	return startStale
}

// heldGenerations maps each VM whose active key this host holds to its
// generation (no key is opened).
func (n *Node) heldGenerations(ctx context.Context) (map[string]uint64, error) {
	infos, err := n.cfg.Keys.List(ctx)
	if err != nil {
		return nil, err
	}
	out := make(map[string]uint64, len(infos))
	for _, k := range infos {
		out[k.VMID] = k.Generation
	}
	return out, nil
}

// CheckStart applies the start rule to vm before its vTPM starts here and
// returns the generation of this host's key. Refusals wrap ErrNotOwner
// (with the rule) or, without quorum and without a last view that
// confirms, ErrRegistryUnavailable too. A stale copy is cleaned by
// SyncOwnership once its owner confirms.
func (n *Node) CheckStart(ctx context.Context, vm string) (uint64, error) {
	held, err := n.heldGenerations(ctx)
	if err != nil {
		return 0, fmt.Errorf("start %s: %w", vm, err)
	}
	gl, ok := held[vm]
	if txID, err := n.cfg.Ledger.Holder(vm); err == nil {
		// A source transaction has released the key (the destination holds
		// it PENDING, and may run the VM), or the key is PENDING here for
		// an incoming migration: no cold start until the transaction ends.
		return 0, n.refuseStart(ctx, vm, gl, fmt.Errorf("start %s: %w: open transaction %s (%s) holds it: no start until it ends (rule %s)",
			vm, ErrNotOwner, txID, n.txRole(txID), RuleOpenTx))
	}
	if !ok {
		if n.cfg.Replicas != nil {
			if r, err := n.cfg.Replicas.Get(vm); err == nil {
				return 0, n.refuseStart(ctx, vm, 0, fmt.Errorf("start %s: %w: %s holds only a standby replica of it (generation %d, owner %s): a replica never starts; a failover promotes it (rule %s)",
					vm, ErrNotOwner, n.cfg.Host, r.Request.Generation, r.Request.Owner, RuleStandbyReplica))
			}
		}
		return 0, fmt.Errorf("start %s: %w: %w: %s holds no key for it", vm, ErrNotOwner, vtpm.ErrKeyNotFound, n.cfg.Host)
	}
	if n.cfg.Registry == nil {
		return gl, nil
	}
	view, verr := n.registryView(ctx, []string{vm}, 0, nil)
	if verr != nil && !view.Stale {
		return 0, fmt.Errorf("start %s: %w", vm, verr)
	}
	var r *registry.VM
	if rec, ok := view.VMs[vm]; ok {
		r = &rec
	}
	switch decideStart(n.cfg.Host, gl, r, verr != nil) {
	case startAllow:
		if verr != nil {
			n.log.WithError(verr).WithField("vm", vm).Warn("registry unavailable: starting by this host's last view, which shows it the owner")
			if g, ok := n.confirmed.Load(vm); !ok || g.(uint64) != gl {
				// F8: the last view includes this host's own fenced state
				// only if this vtpmd confirmed the VM with quorum (its fence
				// record included) since it started: a host that comes back
				// may have been fenced while it was down.
				return 0, n.refuseStart(ctx, vm, gl, fmt.Errorf("start %s: %w: %w: the registry is unavailable and this vtpmd has not confirmed with the registry since it started that %s owns the VM unfenced at generation %d (rule %s)",
					vm, ErrNotOwner, verr, n.cfg.Host, gl, RuleRegistryView))
			}
			if l, ok := n.cfg.Registry.(interface{ Live() bool }); ok && !l.Live() {
				// F8: the last view needs a live lease (a host that just
				// started, or was cut off longer than its TTL, may have
				// been fenced and outrun meanwhile).
				return 0, n.refuseStart(ctx, vm, gl, fmt.Errorf("start %s: %w: %w: the registry is unavailable and %s has no live lease, so its last view (revision %d) may be outdated: a standby may have taken the VM over (rule %s)",
					vm, ErrNotOwner, verr, n.cfg.Host, view.Rev, RuleSelfFence))
			}
			return gl, nil
		}
		if n.cfg.Registered != nil {
			if err := n.cfg.Registered(ctx); err != nil {
				n.confirmed.Delete(vm)
				return 0, n.refuseStart(ctx, vm, gl, fmt.Errorf("start %s: %w: %w: %s is not registered in the fleet registry yet (its liveness key is not there), so a standby that fences it could not see it back: no start until it is (rule %s)",
					vm, ErrNotOwner, err, n.cfg.Host, RuleSelfFence))
			}
		}
		if err := n.checkFenced(ctx, vm); err != nil && !n.takeBackFromDrainingFencer(ctx, vm) {
			n.confirmed.Delete(vm)
			return 0, n.refuseStart(ctx, vm, gl, err)
		}
		n.confirmed.Store(vm, gl)
		return gl, nil
	case startRaise:
		if err := n.raise(ctx, vm, gl, r); err != nil {
			return 0, n.refuseStart(ctx, vm, gl, fmt.Errorf("start %s: the registry is older than this host's generation %d and could not be raised: %w", vm, gl, err))
		}
		return gl, nil
	case startUnknown:
		return 0, n.refuseStart(ctx, vm, gl, fmt.Errorf("start %s: %w: %w: this host's last view (revision %d) does not show %s owning it at generation %d (rule %s)",
			vm, ErrNotOwner, verr, view.Rev, n.cfg.Host, gl, RuleRegistryView))
	case startConflict:
		return 0, n.refuseStart(ctx, vm, gl, fmt.Errorf("start %s: %w: the registry shows %s at generation %d, the same generation this host holds: neither may start it; the operator decides (rule %s)",
			vm, ErrNotOwner, r.Owner, r.Generation, RuleGenerationConflict))
	case startPending:
		return 0, n.refuseStart(ctx, vm, gl, fmt.Errorf("start %s: %w: the registry shows this host at generation %d, its key is at %d: recovery finishes the incoming transaction first (rule %s)",
			vm, ErrNotOwner, r.Generation, gl, RuleRegistryPending))
	}
	err = fmt.Errorf("start %s: %w: the registry shows %s owning it at generation %d, this host's copy is at %d: it is stale and is kept until %s confirms over the agent wire, then shredded (rule %s)",
		vm, ErrNotOwner, r.Owner, r.Generation, gl, r.Owner, RuleStaleCopy)
	return 0, n.refuseStart(ctx, vm, gl, err)
}

// txRole describes an open transaction for a refusal.
func (n *Node) txRole(txID string) string {
	tx, err := n.cfg.Ledger.Get(txID)
	switch {
	case err != nil:
		return "unreadable: " + err.Error()
	case tx.Role == RoleSource:
		return fmt.Sprintf("the key is released to %s, %s", tx.Peer, tx.State)
	}
	return fmt.Sprintf("the key is PENDING here from %s, %s", tx.Peer, tx.State)
}

func (n *Node) refuseStart(ctx context.Context, vm string, gl uint64, err error) error {
	n.audit(ctx, AuditEvent{Event: audit.EventStartRefused, VM: vm, Generation: gl, Detail: err.Error()})
	n.log.WithError(err).WithField("vm", vm).Warn("start refused")
	return err
}

// raise records this host's copy at generation gl over an older record r
// (nil: none): the restore rule's "registry older" row. CAS on the record
// read: if two hosts raise at once, the higher generation wins.
func (n *Node) raise(ctx context.Context, vm string, gl uint64, r *registry.VM) error {
	_, err := n.cfg.Registry.Bump(ctx, registry.Bump{VM: vm, Expect: r, Owner: n.cfg.Host, Generation: gl})
	if err != nil {
		return registryError(err)
	}
	detail := "the registry had no record"
	if r != nil {
		detail = fmt.Sprintf("the registry showed %s at generation %d", r.Owner, r.Generation)
	}
	n.audit(ctx, AuditEvent{Event: audit.EventRegistryRaised, VM: vm, Generation: gl, Detail: detail})
	n.log.WithFields(logrus.Fields{"vm": vm, "generation": gl}).Info("registry raised to this host's generation: " + detail)
	return nil
}

// adopt records VMs of a transaction that the registry does not know (vms
// carry the generation the destination would hold: one above this
// host's).
func (n *Node) adopt(ctx context.Context, vms []TxVM) error {
	var errs []error
	for _, vm := range vms {
		err := n.raise(ctx, vm.UUID, vm.Generation-1, nil)
		if err != nil && !errors.Is(err, registry.ErrExists) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// SyncReport is what SyncOwnership did.
type SyncReport struct {
	Agree     []string          // VMs the registry shows this host owning at its generation
	Raised    []string          // records raised to this host's generation (Bump)
	Aborted   []string          // registry transactions no open ledger transaction held
	Stale     map[string]string // VM -> why this host's copy is stale (kept or shredded)
	Shredded  []string          // stale copies shredded after their owner confirmed
	Conflicts map[string]string // VM -> the other host at the same generation
}

// SyncOwnership applies the start rule to every VM this host holds a key
// for and that no open transaction holds, with one registry read: it
// raises older records, aborts transactions the registry shows open that
// this host's ledger does not, and shreds stale copies whose owner
// confirms it holds the newer generation. vtpmd runs it at start and on
// every recovery tick. Without quorum it changes nothing.
func (n *Node) SyncOwnership(ctx context.Context) (SyncReport, error) {
	rep := SyncReport{Stale: map[string]string{}, Conflicts: map[string]string{}}
	if n.cfg.Registry == nil {
		return rep, nil
	}
	n.recoverMu.Lock()
	defer n.recoverMu.Unlock()
	held, err := n.heldGenerations(ctx)
	if err != nil {
		return rep, err
	}
	var ids []string
	for id := range held {
		if _, err := n.cfg.Ledger.Holder(id); err == nil {
			continue // an open transaction holds it: Reconcile's
		}
		ids = append(ids, id)
	}
	if len(ids) == 0 {
		return rep, nil
	}
	sort.Strings(ids)
	view, err := n.cfg.Registry.VMs(ctx, ids...)
	if err != nil {
		return rep, fmt.Errorf("sync ownership: %w", registryError(err))
	}
	var errs []error
	aborts := map[registry.OpenTx][]registry.VMGen{}
	for _, id := range ids {
		gl := held[id]
		var r *registry.VM
		if rec, ok := view.VMs[id]; ok {
			r = &rec
		}
		switch decideStart(n.cfg.Host, gl, r, false) {
		case startAllow:
			rep.Agree = append(rep.Agree, id)
			if r.Tx != nil && !n.driving(r.Tx.ID) {
				if tx, err := n.cfg.Ledger.Get(r.Tx.ID); err != nil || tx.State.Final() {
					aborts[*r.Tx] = append(aborts[*r.Tx], registry.VMGen{ID: id, Generation: gl})
				}
			}
		case startRaise:
			if err := n.raise(ctx, id, gl, r); err != nil {
				errs = append(errs, fmt.Errorf("raise %s: %w", id, err))
				continue
			}
			rep.Raised = append(rep.Raised, id)
		case startConflict:
			rep.Conflicts[id] = r.Owner
			errs = append(errs, fmt.Errorf("VM %s: %w: %s and %s both hold generation %d (rule %s)", id, ErrNotOwner, n.cfg.Host, r.Owner, gl, RuleGenerationConflict))
		case startPending:
			// An incoming transaction whose PENDING key is not promoted
			// yet would be held by the ledger; a key below the registry's
			// generation with this host as the owner waits for the operator.
			errs = append(errs, fmt.Errorf("VM %s: %w: the registry shows this host at generation %d, its key is at %d (rule %s)", id, ErrNotOwner, r.Generation, gl, RuleRegistryPending))
		case startStale:
			rep.Stale[id] = fmt.Sprintf("%s holds generation %d, this host %d", r.Owner, r.Generation, gl)
			shredded, err := n.cleanStale(ctx, id, r.Owner, r.Generation)
			if err != nil {
				errs = append(errs, err)
			}
			if shredded {
				rep.Shredded = append(rep.Shredded, id)
			}
		}
	}
	for otx, vms := range aborts {
		b := registry.Batch{TxID: otx.ID, From: n.cfg.Host, To: otx.To, VMs: vms}
		if _, err := n.cfg.Registry.Abort(ctx, b); err != nil {
			errs = append(errs, fmt.Errorf("abort registry transaction %s: %w", otx.ID, registryError(err)))
			continue
		}
		for _, v := range vms {
			rep.Aborted = append(rep.Aborted, v.ID)
		}
		n.log.WithFields(logrus.Fields{"tx": otx.ID, "to": otx.To, "vms": len(vms)}).Info("aborted a registry transaction that no open ledger transaction holds")
	}
	return rep, errors.Join(errs...)
}

// cleanStale shreds this host's stale copy of vm once owner confirms over
// the agent wire (mutual TLS: the answer comes from the host the fleet
// certificate names, the registry's enrolled owner) that it holds an
// active key at generation gen or above. Never on the registry's word
// alone, and never while the VM runs here (running VMs are untouched).
func (n *Node) cleanStale(ctx context.Context, vm, owner string, gen uint64) (bool, error) {
	if here, err := n.runsHere(ctx, vm); err != nil || here {
		return false, fmt.Errorf("stale copy of %s: %w: the VM runs here (or its state is unknown: %v); it is left alone", vm, ErrNotOwner, err)
	}
	if _, err := n.cfg.Ledger.Holder(vm); err == nil {
		return false, nil // a transaction holds it now
	}
	peer, err := n.cfg.Dial(ctx, owner)
	if err != nil {
		return false, fmt.Errorf("stale copy of %s kept: %w: %w", vm, ErrPeer, err)
	}
	nonce, err := attest.NewNonce(n.cfg.Rand)
	if err != nil {
		return false, err
	}
	st, err := peer.Status(ctx, &StatusRequest{TxID: fmt.Sprintf("%x", nonce[:16]), VMs: []string{vm}, From: n.cfg.Host})
	if err != nil {
		return false, fmt.Errorf("stale copy of %s kept: %s did not confirm: %w", vm, owner, err)
	}
	if g, ok := st.Held[vm]; !ok || g < gen {
		return false, fmt.Errorf("stale copy of %s kept: %s does not confirm holding generation %d (it holds %d)", vm, owner, gen, g)
	}
	held, err := n.heldGenerations(ctx)
	if err != nil {
		return false, err
	}
	gl, ok := held[vm]
	if !ok || gl >= gen {
		return false, nil // gone or raised meanwhile
	}
	// The shredding is a change of the key store like a migration's: the
	// rollback anchor counts it first (one NV_Increment), or the next start
	// refuses the key store ("the anchor recorded generation N").
	settle, err := n.advance(ctx, Tx{ID: "stale-copy/" + vm}, []vtpm.Change{{VMID: vm}})
	if err != nil {
		return false, fmt.Errorf("shred stale copy of %s: %w", vm, err)
	}
	defer settle()
	if err := n.cfg.Keys.Delete(ctx, vm); err != nil {
		return false, fmt.Errorf("shred stale copy of %s: %w", vm, err)
	}
	if err := n.undefineSecret(ctx, vm); err != nil {
		n.log.WithError(err).WithField("vm", vm).Warn("undefining the vTPM secret of a stale copy")
	}
	n.audit(ctx, AuditEvent{Event: audit.EventStaleShredded, VM: vm, Peer: owner, Generation: gl,
		Detail: fmt.Sprintf("%s confirmed generation %d over the agent wire", owner, st.Held[vm])})
	n.log.WithFields(logrus.Fields{"vm": vm, "owner": owner, "generation": gl, "owner_generation": st.Held[vm]}).Info("stale copy shredded")
	return true, nil
}
