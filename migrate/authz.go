package migrate

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"syscall"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/vtpm"
)

// Destination-side authorisation. The agent wire proves who sent a request
// (the mTLS client certificate names the sender, and the wire refuses a
// request that claims another sender); this file decides whether that
// sender may ask it. A destination accepts a Prepare only
//
//   - from an enrolled host (sender-enrolled): its enrolment store
//     (Config.Enrollments, the registry's records once lane REG wires them)
//     names the sender;
//   - for VMs this host neither owns (owned-here: no active key, so an
//     active key is never replaced) nor runs (runs-here: a running VM's
//     secret is never replaced);
//   - at a sane generation (generation): 1..registry.MaxGeneration, and
//     with a registry exactly the one after the generation the registry
//     shows the sender owning, with this transaction open to this host
//     (registry); without one, above this host's high-water mark (the key
//     store refuses anything at or below it) by at most MaxGenerationStep.
//
// The checks run before the transaction is written to the ledger, so a
// refused Prepare leaves nothing behind and undoes nothing. Finish is
// accepted only from an enrolled host, for a transaction whose peer it is
// (tx-peer). Evidence, Status and Pull answer enrolled hosts only; Status
// reports only VMs of a transaction with the asking host. Identity and
// Activate stay open to every fleet certificate: enrolment itself needs
// them, and they reveal public keys and an activation answer only (the
// enrolment stores refuse to give one TPM to two hosts, attest rule
// enrolled-host).

// Authorisation rules (AuthzError.Rule).
const (
	RuleSenderEnrolled = "sender-enrolled"
	RuleOwnedHere      = "owned-here"
	RuleRunsHere       = "runs-here"
	RuleGeneration     = "generation"
	RuleRegistry       = "registry"
	RuleTxPeer         = "tx-peer"
)

// MaxGenerationStep bounds, without a registry, how far above this host's
// high-water mark a Prepare's generation may be: a VM would need a million
// migrations between two visits to a host to go further. With a registry
// the generation must be exactly the next one.
const MaxGenerationStep = 1 << 20

// AuthzError is a refusal by the destination's authorisation. It names the
// call, the sender, the rule and, when the rule is about one VM, the VM; it
// matches ErrDenied.
type AuthzError struct {
	Call   string // prepare, finish, evidence, status, pull
	Sender string
	VM     string
	Rule   string
	Detail string
}

func (e *AuthzError) Error() string {
	vm := ""
	if e.VM != "" {
		vm = " VM " + e.VM + ":"
	}
	return fmt.Sprintf("%v: %s from %s:%s rule %s: %s", ErrDenied, e.Call, e.Sender, vm, e.Rule, e.Detail)
}

// Unwrap returns ErrDenied.
func (e *AuthzError) Unwrap() error { return ErrDenied }

func deny(call, sender, vm, rule, format string, a ...any) error {
	return &AuthzError{Call: call, Sender: sender, VM: vm, Rule: rule, Detail: fmt.Sprintf(format, a...)}
}

// authorizePeer answers enrolled hosts only.
func (n *Node) authorizePeer(ctx context.Context, call, sender string) error {
	if n.cfg.Enrollments == nil {
		return deny(call, sender, "", RuleSenderEnrolled, "%s has no enrolment store (attestation.enrollments), so it trusts no peer", n.cfg.Host)
	}
	rec, err := attest.EnrolledHost(ctx, n.cfg.Enrollments, sender)
	if err != nil {
		return fmt.Errorf("%s from %s: %w", call, sender, err)
	}
	if rec == nil {
		return deny(call, sender, "", RuleSenderEnrolled, "%s is not enrolled on %s ('vtpmctl host enroll %s' there)", sender, n.cfg.Host, sender)
	}
	return nil
}

// authorizePrepare runs every rule of a Prepare before anything is written.
func (n *Node) authorizePrepare(ctx context.Context, req *PrepareRequest) error {
	const call = "prepare"
	if err := n.authorizePeer(ctx, call, req.Source); err != nil {
		return err
	}
	if _, err := n.cfg.Ledger.Get(req.TxID); err == nil {
		return fmt.Errorf("prepare %s: %w: transaction id already used on this host", req.TxID, ErrReplay)
	}
	for _, w := range req.VMs {
		if err := n.authorizeVM(ctx, call, req.Source, w); err != nil {
			return err
		}
	}
	if n.cfg.Registry != nil {
		return n.authorizeRegistry(ctx, req)
	}
	return nil
}

// authorizeVM runs the per-VM rules of a Prepare (and of a restore):
// generation bounds, owned-here, runs-here and, without a registry, the
// high-water step.
func (n *Node) authorizeVM(ctx context.Context, call, sender string, w WrappedVM) error {
	if w.Generation == 0 || w.Generation > registry.MaxGeneration {
		return deny(call, sender, w.UUID, RuleGeneration, "generation %d is outside 1..%d", w.Generation, registry.MaxGeneration)
	}
	_, gen, err := n.cfg.Keys.Get(ctx, w.UUID)
	switch {
	case err == nil && supersededBy(call, n.cfg.Registry != nil, gen, w.Generation):
		// A restore over this host's superseded copy (authorizeRestore
		// checks that the registry's generation is w.Generation-1, above
		// it): that copy can never start again, and the restore replaces
		// it at commit (finishDest).
	case err == nil:
		return deny(call, sender, w.UUID, RuleOwnedHere, "%s owns the VM at generation %d; a destination never replaces an active key", n.cfg.Host, gen)
	case !errors.Is(err, vtpm.ErrKeyNotFound):
		return deny(call, sender, w.UUID, RuleOwnedHere, "%s holds a key file for the VM that does not open (%v); it cannot prove it does not own it", n.cfg.Host, err)
	}
	d, err := n.cfg.Hypervisor.Domain(ctx, w.UUID)
	if err != nil {
		return fmt.Errorf("%s from %s: VM %s: %w", call, sender, w.UUID, err)
	}
	if d.State == hypervisor.StateRunning {
		return deny(call, sender, w.UUID, RuleRunsHere, "the VM runs on %s; a running VM's secret is never replaced", n.cfg.Host)
	}
	if n.cfg.Registry == nil {
		hw, err := n.cfg.Keys.HighWater(ctx, w.UUID)
		if err != nil {
			return fmt.Errorf("%s from %s: VM %s: %w", call, sender, w.UUID, err)
		}
		if w.Generation > hw+MaxGenerationStep {
			return deny(call, sender, w.UUID, RuleGeneration, "generation %d is more than %d above the highest generation %s has held (%d)",
				w.Generation, MaxGenerationStep, n.cfg.Host, hw)
		}
	}
	return nil
}

// supersededBy reports whether a restore at generation offered may
// replace the active key this host holds at generation held: only with a
// registry (whose record, at offered-1, is then above held: the copy is
// stale, a former owner's kept until its successor confirmed, and no start
// rule admits it), never for a migration (soak seed 6014's replay: a VM
// failed over from host-a, whose stale copy stayed because the new owner
// lost its TPM before it confirmed; the restore onto host-a was refused,
// and no host could ever run the VM again).
func supersededBy(call string, registry bool, held, offered uint64) bool {
	return call == "restore" && registry && held+1 < offered
}

// authorizeRegistry: the registry must show every VM owned by the sender
// at exactly the generation below the one offered, with this transaction
// open to this host. The cache first (the watch usually delivered the
// source's Begin), one read when it does not show the Begin yet.
func (n *Node) authorizeRegistry(ctx context.Context, req *PrepareRequest) error {
	ids := make([]string, len(req.VMs))
	for i, w := range req.VMs {
		ids[i] = w.UUID
	}
	check := func(v registry.View) error {
		for _, w := range req.VMs {
			rec, ok := v.VMs[w.UUID]
			switch {
			case !ok:
				return deny("prepare", req.Source, w.UUID, RuleRegistry, "the registry has no record of the VM")
			case rec.Owner != req.Source:
				return deny("prepare", req.Source, w.UUID, RuleRegistry, "the registry shows the VM owned by %s, not by %s", rec.Owner, req.Source)
			case rec.Generation+1 != w.Generation:
				return deny("prepare", req.Source, w.UUID, RuleRegistry, "generation %d offered, the registry shows generation %d (the next is %d)", w.Generation, rec.Generation, rec.Generation+1)
			case rec.Tx == nil || rec.Tx.ID != req.TxID || rec.Tx.To != n.cfg.Host:
				open := "none"
				if rec.Tx != nil {
					open = fmt.Sprintf("%s to %s", rec.Tx.ID, rec.Tx.To)
				}
				return deny("prepare", req.Source, w.UUID, RuleRegistry, "the registry shows no transaction %s to %s open for the VM (open: %s)", req.TxID, n.cfg.Host, open)
			}
		}
		return nil
	}
	if err := check(n.cfg.Registry.Cached(ids...)); err == nil {
		return nil
	}
	v, err := n.cfg.Registry.VMs(ctx, ids...)
	if err != nil {
		return fmt.Errorf("prepare from %s: read the registry: %w", req.Source, err)
	}
	return check(v)
}

// authorizeFinish: an enrolled sender, the transaction's own peer.
func (n *Node) authorizeFinish(ctx context.Context, req *FinishRequest, tx Tx) error {
	if err := n.authorizePeer(ctx, "finish", req.Source); err != nil {
		return err
	}
	if tx.Role != RoleDestination || tx.Peer != req.Source {
		return deny("finish", req.Source, "", RuleTxPeer, "transaction %s is a %s transaction with %s", tx.ID, tx.Role, tx.Peer)
	}
	return nil
}

// checkPCRs bounds an Evidence request's PCR selection: known banks, PCR
// indexes 0..23, at most 24 per bank.
func checkPCRs(pcrs map[attest.Bank][]int) error {
	if len(pcrs) > 4 {
		return fmt.Errorf("%w: %d PCR banks (at most 4)", ErrBadMessage, len(pcrs))
	}
	for b, list := range pcrs {
		if _, ok := b.Hash(); !ok {
			return fmt.Errorf("%w: unknown PCR bank %q", ErrBadMessage, b)
		}
		if len(list) > 24 {
			return fmt.Errorf("%w: %d %s PCRs (at most 24)", ErrBadMessage, len(list), b)
		}
		if i := slices.IndexFunc(list, func(p int) bool { return p < 0 || p > 23 }); i >= 0 {
			return fmt.Errorf("%w: %s PCR %d out of range 0..23", ErrBadMessage, b, list[i])
		}
	}
	return nil
}

// storageErr marks a full disk as what it is (ErrNoSpace), so that the
// source reports it instead of a peer failure.
func storageErr(err error) error {
	if err != nil && errors.Is(err, syscall.ENOSPC) && !errors.Is(err, ErrNoSpace) {
		return fmt.Errorf("%w: %w", ErrNoSpace, err)
	}
	return err
}

// statusVMs keeps the VMs of a Status request that belong to the
// transaction: a peer learns only about VMs it migrates with this host.
func statusVMs(tx Tx, asked []string) []string {
	var out []string
	for _, id := range asked {
		if slices.ContainsFunc(tx.VMs, func(v TxVM) bool { return v.UUID == id }) {
			out = append(out, id)
		}
	}
	return out
}

// denied reports whether err is a refusal by a peer's authorisation.
func denied(err error) bool { return errors.Is(err, ErrDenied) }
