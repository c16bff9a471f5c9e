// Package recovery owns the operator's side of disaster recovery
// (docs/recovery.md): restoring a VM's vTPM from its escrow bundle onto an
// attested host (Restore), and retiring a dead host (Retire). vtpmctl runs
// them; the test fleets run the same code. The bundle format and the pure
// decisions are migrate/escrow's; the wrapping is a migration's
// (migrate.SealBatch); the destination's rules are migrate's
// (Node.Restore); the fencing is the registry's generation.
package recovery

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/escrow"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/vtpm"
)

// Request is one restore: a bundle, the custodians' identities, where to.
type Request struct {
	Bundle     []byte
	Identities []*escrow.Identity
	// VM is the VM the operator means to restore ("": the bundle's own,
	// as Inspect shows it).
	VM   string
	Dest string
	// Force and AllowOlder are escrow.RestoreOptions.
	Force, AllowOlder bool
	// AcceptDamagedShares: see escrow.OpenOptions.
	AcceptDamagedShares bool
}

// Report says what a restore did.
type Report struct {
	VM             escrow.VM
	Bundle         string
	Dest           string
	Relay          string   // the host that attested the destination and relayed
	Custodians     []string // whose shares opened the bundle
	Damaged        []string // custodians whose shares were damaged (AcceptDamagedShares)
	FromGeneration uint64   // the bundle's
	Generation     uint64   // the restored copy's
	PreviousOwner  string   // the owner the registry showed ("" without one)
	TxID           string
	// Closed is the transaction an earlier, interrupted restore of the VM
	// had left open in the registry, which this one closed first.
	Closed string
	Warm   bool // the destination's evidence was reused
	Took   time.Duration
}

// Restorer runs restores through the local vtpmd (Admin: it attests the
// destination with its policy and relays; it never sees the key) and, in
// registry modes, the fleet registry as the operator (Registry; nil in
// registry mode none).
type Restorer struct {
	Admin    *adminapi.Client
	Registry *registry.Client
	Rand     io.Reader // nil: crypto/rand
	Log      logrus.FieldLogger
	// Crash, when set, runs at each crash point (CrashAfterBegin, ...); an
	// error ends Restore there with nothing undone, as a killed vtpmctl
	// (tests).
	Crash func(point string) error
}

// Restore restores one bundle onto req.Dest:
//
//  1. open the bundle with the identities (k shares; the VM key exists
//     only in this process's memory from here on);
//  2. read the registry (owner, its state and liveness, generation) and
//     decide (escrow.PlanRestore): a stale bundle, or a live owner, or
//     one that is draining or unreachable without Force, is refused;
//  3. the local vtpmd attests the destination with its policy, as a
//     migration source does (nothing has left yet if it is refused);
//  4. the registry opens the restore: Begin from the owner it shows to
//     the destination (one compare-and-swap). A restore transaction an
//     earlier, interrupted restore of the VM left open is closed first
//     (resume.go);
//  5. the key is wrapped for the destination's certified MK (SealBatch)
//     and relayed with the vTPM state; the destination's rules run, its
//     TPM unwraps (4 commands per batch), the key is PENDING and the state
//     staged; its key proof is checked here;
//  6. the registry commits: the destination owns the VM at a generation
//     above every one it has seen, so every older copy is fenced;
//  7. Finish, relayed: the destination puts the state in place and makes
//     the key active.
//
// A failure before step 6 aborts: the registry's transaction is closed
// and the destination drops what it staged; nothing else changed.
func (r *Restorer) Restore(ctx context.Context, req Request) (Report, error) {
	t0 := time.Now()
	rep := Report{Dest: req.Dest}
	rnd := r.Rand
	if rnd == nil {
		rnd = rand.Reader
	}
	log := r.Log
	if log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		log = l
	}
	h, err := escrow.Inspect(req.Bundle)
	if err != nil {
		return rep, fmt.Errorf("restore: %w", err)
	}
	expect := req.VM
	if expect == "" {
		expect = h.VM.UUID
	}
	o, err := escrow.Open(ctx, req.Bundle, expect, req.Identities, escrow.OpenOptions{Log: log, AcceptDamagedShares: req.AcceptDamagedShares})
	if err != nil {
		return rep, fmt.Errorf("restore: %w", err)
	}
	defer o.Destroy()
	hdr := &o.Header
	rep.VM, rep.Bundle, rep.FromGeneration, rep.Custodians, rep.Damaged = hdr.VM, hdr.ID, hdr.Generation, o.Used, o.Damaged

	var view escrow.RegistryView
	var rec registry.VM
	if r.Registry != nil {
		if view, rec, err = r.registryView(ctx, hdr.VM.UUID); err != nil {
			return rep, fmt.Errorf("restore %s: %w", hdr.VM.UUID, err)
		}
		if rec.Tx != nil && isRestoreTx(*rec.Tx, rec.ID, rec.Generation) {
			rep.Closed = rec.Tx.ID
			if rec, err = r.closeInterrupted(ctx, rec, log); err != nil {
				return rep, fmt.Errorf("restore %s: %w", hdr.VM.UUID, err)
			}
		}
		if rec.Tx != nil {
			var closed bool
			if closed, err = r.closeOrphanIntent(ctx, rec, log); err != nil {
				return rep, fmt.Errorf("restore %s: %w", hdr.VM.UUID, err)
			}
			if closed {
				rep.Closed, rec.Tx = rec.Tx.ID, nil
			}
		}
		if rec.Tx != nil {
			return rep, fmt.Errorf("restore %s: %w: transaction %s (to %s) is open for the VM; let it finish first", hdr.VM.UUID, migrate.ErrBusy, rec.Tx.ID, rec.Tx.To)
		}
		rep.PreviousOwner = view.Owner
	}
	plan, err := escrow.PlanRestore(hdr, req.Dest, view, escrow.RestoreOptions{Force: req.Force, AllowOlder: req.AllowOlder})
	if err != nil {
		return rep, fmt.Errorf("restore: %w", err)
	}
	if r.Registry != nil && plan.Generation != rec.Generation+1 {
		return rep, fmt.Errorf("restore %s: %w: the bundle's generation %d is above the registry's %d; the registry is the truth of generations",
			hdr.VM.UUID, escrow.ErrStaleBundle, hdr.Generation, rec.Generation)
	}
	rep.Generation = plan.Generation
	if r.Registry != nil {
		if err := r.checkDest(ctx, req.Dest); err != nil {
			return rep, fmt.Errorf("restore %s: %w", hdr.VM.UUID, err)
		}
	}

	att, err := r.Admin.RestoreAttest(ctx, req.Dest)
	if err != nil {
		return rep, fmt.Errorf("restore %s: attest %s: %w", hdr.VM.UUID, req.Dest, err)
	}
	rep.Relay, rep.Warm = att.Source, att.Warm

	if rep.TxID, err = newRestoreTxID(rnd, hdr.VM.UUID, req.Dest, rec.Generation); err != nil {
		return rep, err
	}
	batch := registry.Batch{TxID: rep.TxID, From: rec.Owner, To: req.Dest, VMs: []registry.VMGen{{ID: rec.ID, Generation: rec.Generation}}}
	if r.Registry != nil {
		if _, err := r.Registry.Begin(ctx, batch); err != nil {
			return rep, fmt.Errorf("restore %s: open the restore in the registry: %w", hdr.VM.UUID, err)
		}
	}
	if err := r.crash(CrashAfterBegin); err != nil {
		return rep, err
	}
	abort := func(cause error) error {
		actx := context.WithoutCancel(ctx)
		var errs []error
		if _, err := relayFinish(actx, r.Admin, req.Dest, migrate.FinishRequest{
			Version: migrate.ProtocolVersion, TxID: rep.TxID, Abort: []string{hdr.VM.UUID}}); err != nil && !errors.Is(err, migrate.ErrUnknownTx) {
			errs = append(errs, fmt.Errorf("the destination's abort: %w", err))
		}
		if r.Registry != nil {
			if _, err := r.Registry.Abort(actx, batch); err != nil {
				errs = append(errs, fmt.Errorf("the registry's abort: %w", err))
			}
		}
		if len(errs) > 0 {
			log.WithError(errors.Join(errs...)).WithField("tx", rep.TxID).Error("restore: abort incomplete")
		}
		return cause
	}

	err = o.Release(ctx, plan, func(ctx context.Context, rel escrow.Release, key vtpm.VMKey) error {
		vms := []migrate.TxVM{{UUID: rel.Plan.VM.UUID, Name: rel.Plan.VM.Name, Generation: rel.Plan.Generation}}
		pr, err := migrate.SealBatch(rnd, att.MKPublic, att.EvidenceDigest, rep.TxID, att.Source, req.Dest, vms, map[string]vtpm.VMKey{rel.Plan.VM.UUID: key})
		if err != nil {
			return err
		}
		sum, _ := hex.DecodeString(rel.StateSHA256)
		resp, err := relayPrepare(ctx, r.Admin, &migrate.RestoreRequest{Prepare: *pr,
			States: []migrate.RestoredState{{UUID: rel.Plan.VM.UUID, Bundle: rel.Plan.BundleID, SHA256: sum, Blob: rel.State}}})
		if err != nil {
			return err
		}
		want, err := key.Proof(migrate.KeyProofLabel(rep.TxID, rel.Plan.VM.UUID, rel.Plan.Generation))
		if err != nil {
			return err
		}
		if !hmac.Equal(want, resp.Proofs[rel.Plan.VM.UUID]) {
			return fmt.Errorf("%w: VM %s on %s", ErrKeyProof, rel.Plan.VM.UUID, req.Dest)
		}
		return r.crash(CrashAfterPrepare)
	})
	if k := (*killed)(nil); errors.As(err, &k) {
		return rep, err // killed: nothing undone
	}
	if err != nil {
		return rep, abort(fmt.Errorf("restore %s to %s: %w", hdr.VM.UUID, req.Dest, err))
	}
	if r.Registry != nil {
		if _, err := r.Registry.Commit(ctx, batch); err != nil {
			return rep, abort(fmt.Errorf("restore %s: commit in the registry: %w", hdr.VM.UUID, err))
		}
	}
	fin, err := relayFinish(ctx, r.Admin, req.Dest, migrate.FinishRequest{
		Version: migrate.ProtocolVersion, TxID: rep.TxID, Commit: []string{hdr.VM.UUID}})
	if err != nil {
		// The registry names the destination the owner: its recovery
		// finishes the commit (the registry decides).
		return rep, fmt.Errorf("restore %s: %w: the registry committed; %s finishes it when it recovers: %w", hdr.VM.UUID, migrate.ErrUnresolved, req.Dest, err)
	}
	if len(fin.Committed) != 1 {
		return rep, fmt.Errorf("restore %s: %w: %s answered %s", hdr.VM.UUID, migrate.ErrUnresolved, req.Dest, fin.State)
	}
	rep.Took = time.Since(t0)
	log.WithFields(logrus.Fields{"vm": hdr.VM.UUID, "dest": req.Dest, "generation": rep.Generation, "bundle": hdr.ID, "tx": rep.TxID}).Info("restored from escrow")
	return rep, nil
}

// registryView reads the VM's record and its owner's state and liveness.
func (r *Restorer) registryView(ctx context.Context, vm string) (escrow.RegistryView, registry.VM, error) {
	v, err := r.Registry.VMs(ctx, vm)
	if err != nil {
		return escrow.RegistryView{}, registry.VM{}, err
	}
	rec, ok := v.VMs[vm]
	if !ok {
		return escrow.RegistryView{}, registry.VM{}, fmt.Errorf("%w (restoring a VM the registry does not know is not built)", ErrNoRegistryRecord)
	}
	view := escrow.RegistryView{Owner: rec.Owner, Generation: rec.Generation, Status: escrow.OwnerNone}
	if rec.Owner == "" {
		return view, rec, nil
	}
	hv, err := r.Registry.Hosts(ctx, rec.Owner)
	if err != nil {
		return escrow.RegistryView{}, registry.VM{}, err
	}
	h := hv.Hosts[rec.Owner]
	switch {
	case h.State == registry.StateFenced:
		view.Status = escrow.OwnerFenced
	case h.State == registry.StateDraining:
		// Draining: moving its VMs away. The operator may force a
		// restore (the new generation fences its copy).
		view.Status = escrow.OwnerDrained
	case h.Live:
		view.Status = escrow.OwnerLive
	default:
		view.Status = escrow.OwnerUnreachable
	}
	return view, rec, nil
}

// checkDest refuses, before anything is attested, a destination the
// registry does not show enrolled and active (Begin would refuse it too;
// an unenrolled host cannot even read the registry to answer).
func (r *Restorer) checkDest(ctx context.Context, dest string) error {
	hv, err := r.Registry.Hosts(ctx, dest)
	if err != nil {
		return err
	}
	h := hv.Hosts[dest]
	switch {
	case h.Enrolment == nil:
		return fmt.Errorf("%w: %s has no enrolment record (rule enrolled): enrol it once ('vtpmctl host enroll %s') before restoring onto it", registry.ErrNotEnrolled, dest, dest)
	case h.State != registry.StateActive:
		return fmt.Errorf("%w: %s is %s (rule host-active): a restore goes to an active host", ErrDestNotActive, dest, h.State)
	}
	return nil
}

// relayPrepare has the local vtpmd relay a restore to its destination.
func relayPrepare(ctx context.Context, c *adminapi.Client, req *migrate.RestoreRequest) (migrate.PrepareResponse, error) {
	var out migrate.PrepareResponse
	return out, c.RestorePrepare(ctx, req, &out)
}

// relayFinish has the local vtpmd relay a restore's commit or abort.
func relayFinish(ctx context.Context, c *adminapi.Client, dest string, fin migrate.FinishRequest) (migrate.FinishResponse, error) {
	var out migrate.FinishResponse
	b, err := json.Marshal(fin)
	if err != nil {
		return out, err
	}
	return out, c.RestoreFinish(ctx, adminapi.RestoreFinishRequest{Dest: dest, Finish: b}, &out)
}
