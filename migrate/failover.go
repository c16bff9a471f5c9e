package migrate

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// Failover (issue 15, docs/failover.md): a standby promotes its replica
// when the VM's owner is gone. The rules, from the protocol model
// (docs/model.md):
//
//   - F7: the old owner is fenced, and so is an open migration's
//     destination (it may run the VM), before the takeover.
//   - F9/F10: the takeover is one CAS on the exact record read (value and
//     revision) that also requires each fenced host's fence record to be
//     newer than the record: a fenced owner counts as gone even when its
//     lease is back (registry.TakeOver).
//   - F11: fencing is per record; an owner fenced for its record refuses to
//     start the VM (CheckStart, rule fenced) while its fencer holds a
//     current replica and is live, and takes it back (Reassert) otherwise.
//   - F10 for every VM of the fenced host: the fencer promotes each VM of
//     a host it fenced of which it holds a current replica, even once the
//     host's lease is back (FencedHere; the daemon's automatic failover).
//   - Without quorum nothing is fenced or promoted: fail closed.
//
// The promotion is a destination transaction in the ledger: the replica's
// key PENDING at a generation above every one known, the state staged,
// the CAS, then the commit (finishDest: the anchor's step, the key active,
// the state in place). A crash in between is settled by Reconcile from
// the registry, like a restore's.

// FailoverRegistry is what replicas and failover need from the registry
// beyond Registry (registry.Client implements it).
type FailoverRegistry interface {
	Registry
	VMRev(ctx context.Context, vm string) (registry.VM, int64, error)
	RefreshStandby(ctx context.Context, s registry.Standby) error
	DropStandby(ctx context.Context, vm, host string) error
	PutFence(ctx context.Context, host, by string) (int64, error)
	FenceOf(ctx context.Context, host string) (registry.Fence, int64, error)
	TakeOver(ctx context.Context, t registry.TakeOver) (registry.VM, error)
	Reassert(ctx context.Context, expect registry.VM, rev int64) (int64, error)
	Standbys(ctx context.Context, vm string) ([]registry.Standby, error)
	Hosts(ctx context.Context, names ...string) (registry.HostsView, error)
}

var _ FailoverRegistry = (*registry.Client)(nil)

// Rules of failover refusals.
const (
	RuleFenced        = "fenced"         // this host was fenced for the VM's record: no start
	RuleOwnerLive     = "owner-live"     // the owner's lease is alive: no automatic failover
	RuleFenceRequired = "fence-required" // no fence agent ran and no operator confirmed the fence
	RuleReplicaStale  = "replica-stale"  // the replica is older than the registry's record
)

// FenceFunc runs the fence agent for a host; nil error means fenced
// (Pacemaker's convention: exit 0).
type FenceFunc func(ctx context.Context, host string) error

// PromoteRequest asks this host to promote its replica of VM.
type PromoteRequest struct {
	VM string
	// Fence fences a host (the configured fence agent); nil: none
	// configured, only ConfirmFenced may stand in.
	Fence FenceFunc
	// ConfirmFenced are hosts the operator confirms fenced (vtpmctl
	// failover --confirm-fenced): no fence agent runs for them, and the
	// owner's liveness is not required to be gone.
	ConfirmFenced []string
}

// Promotion reports a promotion and its timing.
type Promotion struct {
	VM         string
	From       string // the old owner
	Generation uint64
	Fenced     []string
	FenceTime  time.Duration // the fence agents
	Promote    time.Duration // open the replica (host TPM), ledger, PENDING key, CAS, commit: vtpmm's share, the fence excluded
}

// Promote promotes this host's replica of req.VM: fence, CAS, commit. The
// caller then defines the secret and starts the VM (DefineSecret runs the
// start rule, which now agrees), or leaves it to the cloud's HA manager.
func (n *Node) Promote(ctx context.Context, req PromoteRequest) (*Promotion, error) {
	op := "promote " + req.VM
	reg, ok := n.cfg.Registry.(FailoverRegistry)
	if !ok || n.cfg.Replicas == nil {
		return nil, fmt.Errorf("%s: %w: failover needs the fleet registry and a replica store", op, ErrRefused)
	}
	n.recoverMu.Lock()
	defer n.recoverMu.Unlock()
	r, err := n.cfg.Replicas.Get(req.VM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	rec, rev, err := reg.VMRev(ctx, req.VM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, registryError(err))
	}
	p := &Promotion{VM: req.VM, From: rec.Owner}
	if rec.Owner == n.cfg.Host {
		return nil, fmt.Errorf("%s: %w: the registry already shows this host the owner at generation %d", op, ErrBusy, rec.Generation)
	}
	if rec.Generation != r.Request.Generation {
		return nil, n.refuseFailover(ctx, req.VM, rec.Owner, fmt.Errorf("%s: %w: the replica is at generation %d, the registry's record at %d (rule %s)",
			op, ErrFailoverRefused, r.Request.Generation, rec.Generation, RuleReplicaStale))
	}
	if err := n.checkPromoter(ctx, reg); err != nil { // rule draining (failover_drain.go)
		return nil, n.refuseFailover(ctx, req.VM, rec.Owner, fmt.Errorf("%s: %w", op, err))
	}
	// F7: the owner, and an open migration's destination.
	fence := []string{rec.Owner}
	if rec.Tx != nil && rec.Tx.To != n.cfg.Host && rec.Tx.To != rec.Owner {
		fence = append(fence, rec.Tx.To)
	}
	// Open the replica first (this host's TPM: Import, Load, Unseal,
	// Flush): a replica that does not open never costs the VM its owner.
	tOpen := n.cfg.Now()
	k, err := n.openReplica(ctx, &r.Request)
	openTime := n.cfg.Now().Sub(tOpen)
	if err != nil {
		return nil, fmt.Errorf("%s: open the replica: %w", op, err)
	}
	defer k.Destroy()
	// Every host to fence must be fenceable before any fence agent runs:
	// a failover that powers the owner off and then finds the open
	// migration's destination live promotes nothing, and leaves the
	// VM's source transaction with its VM running nowhere (make soak seed
	// 3013).
	todo := make([]bool, len(fence))
	for i, h := range fence {
		var err error
		if todo[i], err = n.mayFence(ctx, reg, req, h, rev); err != nil {
			return nil, n.refuseFailover(ctx, req.VM, rec.Owner, fmt.Errorf("%s: %w", op, err))
		}
	}
	t0 := n.cfg.Now()
	for i, h := range fence {
		if !todo[i] {
			continue // fenced for this record already (F10: even if it is live again)
		}
		if err := n.fenceHost(ctx, reg, req, h, rev); err != nil {
			return nil, n.refuseFailover(ctx, req.VM, rec.Owner, fmt.Errorf("%s: %w", op, err))
		}
	}
	p.Fenced, p.FenceTime = fence, n.cfg.Now().Sub(t0)
	t1 := n.cfg.Now()
	hw, err := n.cfg.Keys.HighWater(ctx, req.VM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	gen := max(rec.Generation, hw) + 1
	pid, err := newTxID(n.cfg.Rand)
	if err != nil {
		return nil, err
	}
	// The promotion is a destination transaction of this host's ledger
	// (a restore's kind: the registry alone decides it), so that a crash
	// at any step is settled by Reconcile: committed when the registry
	// shows this host at gen, dropped otherwise.
	tx := Tx{ID: pid, Role: RoleDestination, Peer: rec.Owner, State: DstPending, Restore: true,
		VMs: []TxVM{{UUID: req.VM, Name: r.Request.Name, Generation: gen}}}
	if err := n.cfg.Ledger.Begin(tx); err != nil {
		return nil, fmt.Errorf("%s: %w", op, storageErr(err))
	}
	defer n.drive(pid)()
	if err := n.cfg.Keys.PutPending(ctx, req.VM, pid, gen, k); err != nil {
		n.abortPromotion(ctx, tx)
		return nil, fmt.Errorf("%s: %w", op, storageErr(err))
	}
	if n.cfg.States != nil {
		if err := n.cfg.States.Stage(ctx, pid, req.VM, r.Request.State); err != nil {
			n.abortPromotion(ctx, tx)
			return nil, fmt.Errorf("%s: stage the state: %w", op, err)
		}
	}
	// The race: one CAS. Of standbys racing, exactly one wins.
	if _, err := reg.TakeOver(ctx, registry.TakeOver{VM: req.VM, Expect: rec, ExpectRev: rev, Owner: n.cfg.Host, Generation: gen, Fenced: fence}); err != nil {
		if !errors.Is(registryError(err), ErrRegistryUnavailable) {
			n.abortPromotion(ctx, tx) // lost: this host stays (or becomes again) a standby
		} // unknown outcome: Reconcile settles it by the registry
		return nil, n.refuseFailover(ctx, req.VM, rec.Owner, fmt.Errorf("%s: %w", op, registryError(err)))
	}
	if err := n.crash(FailoverAfterTakeOver); err != nil {
		return nil, err
	}
	if _, err := n.finishDest(ctx, tx, []string{req.VM}, nil); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	n.replicaPromoted(ctx, req.VM)
	p.Generation, p.Promote = gen, openTime+n.cfg.Now().Sub(t1)
	n.audit(ctx, AuditEvent{Event: audit.EventPromoted, VM: req.VM, Peer: rec.Owner, Generation: gen,
		Detail: fmt.Sprintf("failover from %s at generation %d; fenced %v", rec.Owner, rec.Generation, fence)})
	n.log.WithFields(logrus.Fields{"vm": req.VM, "from": rec.Owner, "generation": gen, "fenced": fence}).Warn("failover: replica promoted; this host owns the VM")
	return p, nil
}

// mayFence reports whether h must be fenced for a promotion from the
// record at rev (false: it is fenced for the record already, F10), or why
// it cannot be: its lease is alive and the operator did not confirm it
// fenced, or no fence agent is configured.
func (n *Node) mayFence(ctx context.Context, reg FailoverRegistry, req PromoteRequest, h string, rev int64) (bool, error) {
	if _, frev, err := reg.FenceOf(ctx, h); err != nil {
		return false, registryError(err)
	} else if frev > rev {
		return false, nil
	}
	if slices.Contains(req.ConfirmFenced, h) {
		return true, nil
	}
	v, err := reg.Hosts(ctx, h)
	if err != nil {
		return false, registryError(err)
	}
	if v.Hosts[h].Live {
		return false, fmt.Errorf("%w: %s's liveness lease is alive (rule %s)", ErrFailoverRefused, h, RuleOwnerLive)
	}
	if req.Fence == nil {
		return false, fmt.Errorf("%w: no fence agent is configured for %s: an operator fences it and runs 'vtpmctl failover %s --to %s --confirm-fenced %s' (rule %s)",
			ErrFailoverRefused, h, req.VM, n.cfg.Host, h, RuleFenceRequired)
	}
	return true, nil
}

// fenceHost fences h for a promotion (mayFence said it must be): the
// operator's confirmation, or the fence agent once the host's lease is
// gone (checked again); then its fence record.
func (n *Node) fenceHost(ctx context.Context, reg FailoverRegistry, req PromoteRequest, h string, rev int64) error {
	by := "operator confirmation"
	if !slices.Contains(req.ConfirmFenced, h) {
		if must, err := n.mayFence(ctx, reg, req, h, rev); err != nil || !must {
			return err
		}
		if err := req.Fence(ctx, h); err != nil {
			return fmt.Errorf("%w: the fence agent for %s failed: %w (rule %s)", ErrFailoverRefused, h, err, RuleFenceRequired)
		}
		by = "fence agent"
	}
	if _, err := reg.PutFence(ctx, h, n.cfg.Host); err != nil {
		return registryError(err)
	}
	if by == "fence agent" {
		// The host may have come back between the fence agent and the
		// fence record (powered on again, a quick reboot) and started the
		// VM then: its start rule did not see the fence yet (soak seed
		// 4018, the VM then ran on two hosts). From the record on, it
		// refuses; so if it is live now, fence it once more.
		if v, err := reg.Hosts(ctx, h); err != nil {
			return registryError(err)
		} else if v.Hosts[h].Live {
			if err := req.Fence(ctx, h); err != nil {
				return fmt.Errorf("%w: %s came back before its fence record and the fence agent failed the second time: %w (rule %s)", ErrFailoverRefused, h, err, RuleFenceRequired)
			}
			by = "fence agent, twice (the host came back before its fence record)"
		}
	}
	n.audit(ctx, AuditEvent{Event: audit.EventFenced, VM: req.VM, Peer: h, Detail: by})
	n.log.WithFields(logrus.Fields{"vm": req.VM, "fenced": h, "by": by}).Warn("host fenced for a failover")
	return nil
}

// openReplica unwraps the replica's transfer key in this host's TPM and
// opens the VM key (memory only).
func (n *Node) openReplica(ctx context.Context, r *ReplicaRequest) (vtpm.VMKey, error) {
	n.tpmMu.Lock()
	tk, err := identity.Unwrap(ctx, n.cfg.TPM, n.cfg.Identity.MK, &r.TransferKey, identity.UnwrapOptions{})
	n.tpmMu.Unlock()
	if err != nil {
		return vtpm.VMKey{}, fmt.Errorf("%w: unwrap the transfer key: %w", ErrDestTPM, err)
	}
	s, err := transferSealer(tk, n.cfg.Rand)
	wipe(tk)
	if err != nil {
		return vtpm.VMKey{}, err
	}
	return s.OpenKey(vtpm.Sealed{Nonce: r.Nonce, Ciphertext: r.Ciphertext}, replicaBinding(r))
}

// abortPromotion ends a promotion that lost (or failed before its CAS):
// its PENDING key and staged state dropped, the ledger's transaction
// aborted. The replica stays.
func (n *Node) abortPromotion(ctx context.Context, tx Tx) {
	if _, err := n.finishDest(ctx, tx, nil, vmIDs(tx.VMs)); err != nil {
		n.log.WithError(err).WithField("tx", tx.ID).Warn("failover: aborting a promotion; recovery retries")
	}
}

// replicaPromoted drops the replica that became this host's key, and this
// host's standby record.
func (n *Node) replicaPromoted(ctx context.Context, vm string) {
	if err := n.cfg.Replicas.Drop(vm); err != nil {
		n.log.WithError(err).WithField("vm", vm).Warn("dropping a promoted replica")
	}
	if reg, ok := n.cfg.Registry.(FailoverRegistry); ok {
		if err := reg.DropStandby(ctx, vm, n.cfg.Host); err != nil {
			n.log.WithError(err).WithField("vm", vm).Warn("dropping this host's standby record after a promotion")
		}
	}
}

// ResumePromotions cleans up after a promotion a crash interrupted once
// Reconcile settled its transaction: a replica of a VM whose key this
// host now holds above the replica's generation is dropped.
func (n *Node) ResumePromotions(ctx context.Context) error {
	if n.cfg.Replicas == nil {
		return nil
	}
	rs, err := n.cfg.Replicas.List()
	if err != nil {
		return err
	}
	held, err := n.heldGenerations(ctx)
	if err != nil {
		return err
	}
	for _, r := range rs {
		if g, ok := held[r.Request.VM]; ok && g > r.Request.Generation {
			n.replicaPromoted(ctx, r.Request.VM)
		}
	}
	return nil
}

// fenceGoneDest is model finding F12: a source whose destination is gone
// (its lease expired, unreachable) while the migration's intent is open
// fences it with the fence agent (Config.Fence) and records the fence;
// the source then aborts and the VM restarts from its key. Without a
// fence agent, or while the destination is live, it waits (false).
func (n *Node) fenceGoneDest(ctx context.Context, tx Tx, vm string) bool {
	reg, ok := n.cfg.Registry.(FailoverRegistry)
	if !ok || n.cfg.Fence == nil {
		return false
	}
	v, err := reg.Hosts(ctx, tx.Peer)
	if err != nil || v.Hosts[tx.Peer].Live {
		return false
	}
	if err := n.cfg.Fence(ctx, tx.Peer); err != nil {
		n.log.WithError(err).WithFields(logrus.Fields{"tx": tx.ID, "dest": tx.Peer}).Warn("F12: the fence agent did not fence the gone destination; waiting")
		return false
	}
	if _, err := reg.PutFence(ctx, tx.Peer, n.cfg.Host); err != nil {
		return false
	}
	n.audit(ctx, AuditEvent{Event: audit.EventFenced, VM: vm, Peer: tx.Peer, TxID: tx.ID, Detail: "the migration's destination is gone with the intent open (F12): fenced, the migration aborts"})
	n.log.WithFields(logrus.Fields{"tx": tx.ID, "dest": tx.Peer, "vm": vm}).Warn("F12: gone destination fenced; the migration aborts and the VM restarts here")
	return true
}

// refuseFailover audits and returns a failover refusal.
func (n *Node) refuseFailover(ctx context.Context, vm, owner string, err error) error {
	n.audit(ctx, AuditEvent{Event: audit.EventFailoverRefused, VM: vm, Peer: owner, Detail: err.Error()})
	n.log.WithError(err).WithField("vm", vm).Warn("failover refused")
	return err
}

// checkFenced is the start rule's fence check (F11): a host fenced for
// the VM's record refuses to start it while its fencer may still promote
// it, and takes it back (Reassert) otherwise:
//
//   - the fencer is gone (no lease) or retired (host state fenced): it
//     never promoted and never will;
//   - the fencer is live but holds no current replica of the VM (its
//     standby record is absent or at another generation than the record):
//     it fenced this host for another VM (the fence record is per host)
//     and cannot promote this one.
//
// A live fencer with a current replica promotes it (its automatic
// failover looks for the VMs of the hosts it fenced: FencedHere), so this
// host waits (rule fenced, retryable). Reassert and the fencer's TakeOver
// are compare-and-swaps on the same record revision: exactly one wins,
// even when the replica became current between this check and the CAS.
func (n *Node) checkFenced(ctx context.Context, vm string) error {
	fenced, f, rec, rev, err := n.fencedFor(ctx, vm)
	if err != nil {
		return fmt.Errorf("start %s: %w: read the fence record: %w", vm, ErrNotOwner, registryError(err))
	}
	if !fenced {
		return nil
	}
	reg := n.cfg.Registry.(FailoverRegistry)
	why := "never promoted and is gone (no lease) or retired"
	if f.By != n.cfg.Host {
		v, err := reg.Hosts(ctx, f.By)
		if err != nil {
			return fmt.Errorf("start %s: %w: %w", vm, ErrNotOwner, registryError(err))
		}
		if fh := v.Hosts[f.By]; fh.Live && fh.State != registry.StateFenced { // a retired fencer never wins a TakeOver
			cur, err := currentReplica(ctx, reg, vm, f.By, rec.Generation)
			if err != nil {
				return fmt.Errorf("start %s: %w: read %s's standby record: %w", vm, ErrNotOwner, f.By, registryError(err))
			}
			if cur {
				return fmt.Errorf("start %s: %w: %s fenced this host at %s for the VM's record at generation %d, is live and holds a current replica: it promotes it (or an operator runs 'vtpmctl failover %s --to %s'): no start (rule %s)",
					vm, ErrNotOwner, f.By, f.At.Format(time.RFC3339), rec.Generation, vm, f.By, RuleFenced)
			}
			why = "holds no current replica of it"
		}
	}
	if _, err := reg.Reassert(ctx, rec, rev); err != nil {
		return fmt.Errorf("start %s: %w: fenced by %s, which %s; taking the VM back failed: %w (rule %s)", vm, ErrNotOwner, f.By, why, registryError(err), RuleFenced)
	}
	n.audit(ctx, AuditEvent{Event: audit.EventRegistryRaised, VM: vm, Peer: f.By, Generation: rec.Generation,
		Detail: "fenced by " + f.By + ", which " + why + ": the record is reasserted (F11)"})
	n.log.WithFields(logrus.Fields{"vm": vm, "fencer": f.By, "generation": rec.Generation}).Warn("fenced, but the fencer " + why + ": VM taken back")
	return nil
}

// currentReplica reports whether host's standby record of vm shows a
// replica at generation gen (the record's: a replica it may promote).
func currentReplica(ctx context.Context, reg FailoverRegistry, vm, host string, gen uint64) (bool, error) {
	sbs, err := reg.Standbys(ctx, vm)
	if err != nil {
		return false, err
	}
	for _, s := range sbs {
		if s.Host == host {
			return s.Generation != 0 && s.Generation == gen, nil
		}
	}
	return false, nil
}

// FencedHere reports whether this host fenced vm's owner for the VM's
// current record (the owner's fence record is by this host and newer than
// the record), with the record. The fence is the proof that the owner
// does not run the VM (F10), whatever its lease says now: the fencer
// fails over every VM of a host it fenced of which it holds a current
// replica, not only the one it fenced the host for, and even after a
// restart (the automatic failover asks on each pass). Otherwise the owner
// would wait for it (checkFenced) and the VM would run nowhere.
func (n *Node) FencedHere(ctx context.Context, vm string) (bool, registry.VM, error) {
	reg, ok := n.cfg.Registry.(FailoverRegistry)
	if !ok {
		return false, registry.VM{}, nil
	}
	rec, rev, err := reg.VMRev(ctx, vm)
	if err != nil || rec.Owner == n.cfg.Host || rec.Owner == "" {
		return false, rec, registryError(err)
	}
	f, frev, err := reg.FenceOf(ctx, rec.Owner)
	if err != nil {
		return false, rec, registryError(err)
	}
	return frev > rev && f.By == n.cfg.Host, rec, nil
}

// fencedFor reports whether this host is fenced for vm's current record
// (its fence record is newer than the record: F11), with the fence, the
// record and its revision.
func (n *Node) fencedFor(ctx context.Context, vm string) (bool, registry.Fence, registry.VM, int64, error) {
	reg, ok := n.cfg.Registry.(FailoverRegistry)
	if !ok {
		return false, registry.Fence{}, registry.VM{}, 0, nil
	}
	f, frev, err := reg.FenceOf(ctx, n.cfg.Host)
	if err != nil || frev == 0 {
		return false, f, registry.VM{}, 0, err
	}
	rec, rev, err := reg.VMRev(ctx, vm)
	if err != nil {
		return false, f, rec, rev, err
	}
	return frev > rev, f, rec, rev, nil
}
