package migrate

import (
	"context"
	"errors"
	"fmt"

	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/vtpm"
)

// releaseSpec is what release needs to hand keys to a destination.
type releaseSpec struct {
	txID string
	vms  []string
	dest string
	// pulled marks a transaction the destination asked for (Pull): the
	// hypervisor, not this node, migrates the VMs.
	pulled bool
	// claimed: the caller opened txID in the registry (Request.Claimed).
	claimed bool
	// keyOnly: the keys move alone (Request.KeyOnly).
	keyOnly bool
	// precheck, when set, runs once this node is known to own every VM and
	// before the transaction is opened; an error refuses the release.
	precheck func(ctx context.Context) error
}

// release runs the first half of a migration, up to SrcPrepared: it opens
// the transaction, attests the destination (or reuses fresh evidence),
// wraps the keys, sends Prepare and checks the key proofs. It fills keys
// (the caller destroys them). On failure the transaction was refused or
// aborted, or, when the destination could not confirm an abort, left open
// for Reconcile; the source keeps ownership either way.
func (n *Node) release(ctx context.Context, s releaseSpec, keys map[string]vtpm.VMKey, progress Progress, res *Result) (Tx, Peer, error) {
	if len(s.vms) == 0 {
		return Tx{}, nil, fmt.Errorf("migrate: %w: no VM given", ErrBadMessage)
	}
	if s.dest == n.cfg.Host {
		return Tx{}, nil, fmt.Errorf("migrate: %w: destination %s is this host", ErrBadMessage, s.dest)
	}
	if err := n.selfFenced("migrate to " + s.dest); err != nil {
		return Tx{}, nil, err
	}
	tx := Tx{ID: s.txID, Role: RoleSource, Peer: s.dest, State: SrcBegun, Pulled: s.pulled, KeyOnly: s.keyOnly}
	if s.pulled {
		tx.Lease = n.cfg.Now().Add(n.cfg.PullLease)
	}
	for _, id := range s.vms {
		k, gen, err := n.cfg.Keys.Get(ctx, id)
		if errors.Is(err, vtpm.ErrKeyNotFound) {
			return Tx{}, nil, fmt.Errorf("migrate %s: %w", id, ErrNotOwner)
		}
		if err != nil {
			return Tx{}, nil, fmt.Errorf("migrate %s: %w", id, err)
		}
		keys[id] = k
		tx.VMs = append(tx.VMs, TxVM{UUID: id, Generation: gen + 1})
	}
	if s.precheck != nil {
		if err := s.precheck(ctx); err != nil {
			return Tx{}, nil, err
		}
	}
	if err := n.cfg.Ledger.Begin(tx); err != nil {
		return Tx{}, nil, fmt.Errorf("migrate: %w", err)
	}
	if err := n.crash(SrcAfterBegin); err != nil {
		return Tx{}, nil, err
	}
	// The rollback anchor counts the open transaction (F13) before anyone
	// else hears of it: a data directory restored from before this point
	// is refused at start rather than forgetting the migration.
	if err := n.beginStep(ctx, tx); err != nil {
		if _, lerr := n.cfg.Ledger.SetState(tx.ID, SrcAborted, err.Error()); lerr != nil {
			n.log.WithError(lerr).WithField("tx", tx.ID).Error("ledger: abort")
		}
		if s.claimed {
			n.regAbort(ctx, tx, tx.VMs)
		}
		n.done(OutcomeFailed)
		return Tx{}, nil, fmt.Errorf("migrate: %w", err)
	}
	if n.cfg.Registry != nil && !s.claimed {
		// Registry round trip 1, before anything is sent: each VM must be
		// this host's at exactly the generation its key store holds, the
		// destination enrolled and active. Refused or without quorum,
		// nothing moves.
		t0 := n.cfg.Now()
		err := n.regBegin(ctx, tx)
		res.Registry.RoundTrips++
		res.Registry.Time += n.cfg.Now().Sub(t0)
		if err != nil {
			if _, lerr := n.cfg.Ledger.SetState(tx.ID, SrcAborted, "registry begin: "+err.Error()); lerr != nil {
				n.log.WithError(lerr).WithField("tx", tx.ID).Error("ledger: abort")
			} else {
				n.settleStep(ctx, tx)
			}
			n.done(OutcomeRefused)
			return Tx{}, nil, fmt.Errorf("migrate to %s: registry: %w", s.dest, err)
		}
		if err := n.crash(SrcAfterRegBegin); err != nil {
			return Tx{}, nil, err
		}
	}
	peer, err := n.cfg.Dial(ctx, s.dest)
	if err != nil {
		n.abortLocal(ctx, tx, fmt.Sprintf("dial %s: %v", s.dest, err))
		return Tx{}, nil, fmt.Errorf("migrate to %s: %w: %v", s.dest, ErrPeer, err)
	}

	progress(PhaseAttest, s.dest)
	start := n.cfg.Now()
	v, warm, err := n.destEvidence(ctx, peer, s.dest, res)
	if err != nil {
		n.refuse(ctx, tx, err)
		return Tx{}, nil, err
	}
	res.Warm = warm
	n.observe(string(PhaseAttest), start)
	if err := n.crash(SrcAfterAttest); err != nil {
		return Tx{}, nil, err
	}

	progress(PhaseWrap, fmt.Sprintf("%d key(s) under one transfer key", len(tx.VMs)))
	start = n.cfg.Now()
	preq, err := n.wrap(tx, v, keys)
	if err == nil {
		preq.RegistryRev = n.registryRev(vmIDs(tx.VMs))
	}
	if err != nil {
		n.abortLocal(ctx, tx, err.Error())
		return Tx{}, nil, fmt.Errorf("migrate: wrap: %w", err)
	}
	n.observe(string(PhaseWrap), start)

	progress(PhasePrepare, s.dest)
	start = n.cfg.Now()
	res.RoundTrips.Before++
	presp, err := peer.Prepare(ctx, preq)
	if err == nil {
		err = checkProofs(tx, presp, keys)
	}
	if err != nil {
		n.ForgetEvidence(s.dest)
		if denied(err) {
			// The destination's authorisation runs before it writes
			// anything: there is nothing to abort there.
			n.abortLocal(ctx, tx, fmt.Sprintf("prepare: %v", err))
			for _, vm := range tx.VMs {
				n.audit(ctx, AuditEvent{Event: audit.EventMigrationAbort, VM: vm.UUID, Peer: tx.Peer, TxID: tx.ID, Detail: err.Error()})
			}
		} else {
			n.abortRemote(ctx, peer, tx, fmt.Sprintf("prepare: %v", err))
		}
		n.done(OutcomeFailed)
		return Tx{}, nil, fmt.Errorf("migrate to %s: prepare: %w", s.dest, err)
	}
	if err := n.crash(SrcAfterPrepare); err != nil {
		return Tx{}, nil, err
	}
	detail := ""
	if s.pulled {
		detail = "pulled by the destination for a hypervisor migration"
	}
	for _, vm := range tx.VMs {
		n.audit(ctx, AuditEvent{Event: audit.EventKeyRelease, VM: vm.UUID, Peer: s.dest, TxID: tx.ID, Generation: vm.Generation, Detail: detail})
	}
	if tx, err = n.cfg.Ledger.SetState(tx.ID, SrcPrepared, ""); err != nil {
		return Tx{}, nil, err
	}
	n.observe(string(PhasePrepare), start)
	if err := n.crash(SrcAfterPrepared); err != nil {
		return Tx{}, nil, err
	}
	return tx, peer, nil
}

func vmIDs(vms []TxVM) []string {
	out := make([]string, len(vms))
	for i, vm := range vms {
		out[i] = vm.UUID
	}
	return out
}

func destroyKeys(keys map[string]vtpm.VMKey) {
	for _, k := range keys {
		k.Destroy()
	}
}
