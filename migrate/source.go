package migrate

import (
	"bytes"
	"context"
	"crypto/hmac"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// Phase names a step of a migration, for progress output and metrics.
type Phase string

// Phases, in order.
const (
	PhaseAttest     Phase = "attest"
	PhaseWrap       Phase = "wrap"
	PhasePrepare    Phase = "prepare"
	PhaseHypervisor Phase = "hypervisor"
	PhaseCommit     Phase = "commit"
	PhaseAbort      Phase = "abort"
)

// Progress receives each phase as it starts, with a short detail.
type Progress func(p Phase, detail string)

// Request asks to migrate VMs (by UUID) to one destination host.
type Request struct {
	VMs  []string
	Dest string
	// TxID, when set, is the transaction's ID (else a random one).
	TxID string
	// Claimed says the caller already opened TxID in the fleet registry
	// for these VMs towards Dest (an evacuation's claim: registry.Begin
	// under TxID), so the migration skips its own Begin. The caller holds
	// the transaction (Node.Hold) from its claim on.
	Claimed bool
	// Slots, when set, bounds the hypervisor migrations running at once
	// across callers (an evacuation's batches); the VMs of this request
	// then migrate concurrently, each holding a slot. Nil: one after another.
	Slots Slots
	// OnVM, when set, is told as each VM's hypervisor migration starts and ends.
	OnVM func(VMEvent)
	// KeyOnly moves the keys alone, to the host that holds the VMs'
	// domains and vTPM states already (Reunite): no domain may be defined
	// here, and each VM commits only if the destination, asked after its
	// Prepare, holds its domain, shut off.
	KeyOnly bool
}

// Slots bounds concurrent hypervisor migrations (evacuate.Slots).
type Slots interface {
	// Acquire waits for a slot; an error means the migration must not start.
	Acquire(ctx context.Context) (release func(), err error)
}

// VMEvent is one VM's hypervisor migration starting (Started) or ending.
type VMEvent struct {
	VM      string
	Started bool
	Done    bool
	Err     error // Done: the hypervisor's error; not Started: why it did not start
	Elapsed time.Duration
}

// Result reports a migration.
type Result struct {
	TxID       string
	Committed  []string          // now owned by the destination
	Failed     map[string]string // VM -> reason; still owned by the source
	Warm       bool              // destination evidence was reused
	RoundTrips struct{ Before, After int }
	// Registry is what the fleet registry cost the source: its round
	// trips (Begin and Commit: 2 per batch) and their wall time.
	Registry struct {
		RoundTrips int
		Time       time.Duration
	}
}

func newTxID(r io.Reader) (string, error) {
	b := make([]byte, 16)
	if _, err := io.ReadFull(r, b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

// Migrate moves the VMs' vTPM keys to req.Dest and has the hypervisor
// live-migrate them: attest (or reuse fresh evidence), wrap one transfer
// key for the destination's MK, Prepare, migrate, Finish. The source opens
// its keys from memory: 0 TPM commands. On any failure before the
// hypervisor's migration the source keeps ownership; after it, each VM's
// outcome decides.
func (n *Node) Migrate(ctx context.Context, req Request, progress Progress) (*Result, error) {
	if progress == nil {
		progress = func(Phase, string) {}
	}
	txID := req.TxID
	if txID == "" {
		var err error
		if txID, err = newTxID(n.cfg.Rand); err != nil {
			return nil, err
		}
	}
	log := n.log.WithFields(logrus.Fields{"tx": txID, "dest": req.Dest})
	keys := make(map[string]vtpm.VMKey, len(req.VMs))
	defer destroyKeys(keys)
	// Mark the transaction as ours before it exists in the ledger, so that
	// a concurrent Reconcile never sees it unmarked.
	defer n.drive(txID)()
	res := &Result{TxID: txID, Failed: map[string]string{}}
	spec := releaseSpec{txID: txID, vms: req.VMs, dest: req.Dest, claimed: req.Claimed, keyOnly: req.KeyOnly}
	if req.KeyOnly {
		spec.precheck = func(ctx context.Context) error { return n.noDomainHere(ctx, req.VMs) }
	}
	tx, peer, err := n.release(ctx, spec, keys, progress, res)
	if err != nil {
		return res, err
	}
	warm := res.Warm

	var outcomes map[string]error
	start := n.cfg.Now()
	if req.KeyOnly {
		progress(PhaseHypervisor, "none: the domains are on "+req.Dest+" already")
		outcomes = n.domainsThere(ctx, peer, tx)
	} else {
		progress(PhaseHypervisor, "live migration")
		outcomes = n.hypervisorMigrate(ctx, req, tx)
		n.observe(string(PhaseHypervisor), start)
	}
	if err := n.crash(SrcAfterHypervisor); err != nil {
		return res, err
	}
	tx, err = n.cfg.Ledger.Update(txID, func(t *Tx) error {
		for i := range t.VMs {
			if e := outcomes[t.VMs[i].UUID]; e != nil {
				t.VMs[i].Outcome, t.VMs[i].Error = OutcomeFailed, e.Error()
			} else {
				t.VMs[i].Outcome = OutcomeMigrated
			}
		}
		t.State = SrcMigrated
		return nil
	})
	if err != nil {
		return res, err
	}
	if err := n.crash(SrcAfterMigrated); err != nil {
		return res, err
	}

	progress(PhaseCommit, req.Dest)
	start = n.cfg.Now()
	if n.cfg.Registry != nil {
		// Registry round trip 2, the commit point: the destination owns
		// the VMs that moved, at the next generation.
		t0 := n.cfg.Now()
		err := n.regCommit(ctx, tx)
		res.Registry.RoundTrips++
		res.Registry.Time += n.cfg.Now().Sub(t0)
		if err != nil {
			return res, err
		}
		if err := n.crash(SrcAfterRegCommit); err != nil {
			return res, err
		}
	}
	res.RoundTrips.After++
	if err := n.finishSource(ctx, peer, tx); err != nil {
		return res, err
	}
	n.observe(string(PhaseCommit), start)
	for _, vm := range tx.VMs {
		if vm.Outcome == OutcomeMigrated {
			res.Committed = append(res.Committed, vm.UUID)
		} else {
			res.Failed[vm.UUID] = fmt.Sprintf("%v: %s", ErrHypervisor, vm.Error)
		}
	}
	log.WithFields(logrus.Fields{"committed": len(res.Committed), "failed": len(res.Failed), "warm": warm}).Info("migration finished")
	if len(res.Failed) > 0 {
		var first error
		for id, e := range outcomes {
			if e != nil && req.KeyOnly {
				first = fmt.Errorf("move the key of %s to %s: %w", id, req.Dest, e)
				break
			}
			if e != nil {
				first = fmt.Errorf("migrate %s to %s: %w: %w", id, req.Dest, ErrHypervisor, e)
				break
			}
		}
		return res, first
	}
	return res, nil
}

// hypervisorMigrate has the hypervisor live-migrate every VM of tx: one
// after another, or, with req.Slots, concurrently, each holding a slot (a
// VM that gets none does not start and fails). It returns each VM's error.
func (n *Node) hypervisorMigrate(ctx context.Context, req Request, tx Tx) map[string]error {
	outcomes := make(map[string]error, len(tx.VMs))
	target, err := n.cfg.Target(req.Dest)
	if err != nil {
		for _, vm := range tx.VMs {
			outcomes[vm.UUID] = err
		}
		return outcomes
	}
	onVM := req.OnVM
	if onVM == nil {
		onVM = func(VMEvent) {}
	}
	one := func(id string) error {
		if req.Slots != nil {
			release, err := req.Slots.Acquire(ctx)
			if err != nil {
				err = fmt.Errorf("%w: %w", ErrNotStarted, err)
				onVM(VMEvent{VM: id, Done: true, Err: err})
				return err
			}
			defer release()
		}
		start := n.cfg.Now()
		onVM(VMEvent{VM: id, Started: true})
		err := n.cfg.Hypervisor.Migrate(ctx, id, target)
		onVM(VMEvent{VM: id, Done: true, Err: err, Elapsed: n.cfg.Now().Sub(start)})
		return err
	}
	if req.Slots == nil {
		for _, vm := range tx.VMs {
			outcomes[vm.UUID] = one(vm.UUID)
		}
		return outcomes
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, vm := range tx.VMs {
		wg.Add(1)
		go func(id string) {
			defer wg.Done()
			err := one(id)
			mu.Lock()
			outcomes[id] = err
			mu.Unlock()
		}(vm.UUID)
	}
	wg.Wait()
	return outcomes
}

// Hold marks transaction txID as driven by this node until the returned
// func runs, so that neither Reconcile nor the ownership sync touches it:
// an evacuation holds it from its registry claim (Request.Claimed) on.
func (n *Node) Hold(txID string) func() { return n.drive(txID) }

// Attest verifies dest under the attestation policy, or finds its verified
// evidence still fresh (EvidenceMaxAge), and caches it for the next
// migration. A refusal wraps *attest.RefusalError and ErrRefused.
func (n *Node) Attest(ctx context.Context, dest string) error {
	if dest == n.cfg.Host {
		return fmt.Errorf("attest: %w: destination %s is this host", ErrBadMessage, dest)
	}
	peer, err := n.cfg.Dial(ctx, dest)
	if err != nil {
		return fmt.Errorf("attest %s: %w: %v", dest, ErrPeer, err)
	}
	start := n.cfg.Now()
	_, _, err = n.destEvidence(ctx, peer, dest, &Result{})
	if err == nil {
		n.observe(string(PhaseAttest), start)
	} else if re, ok := asRefusal(err); ok && n.cfg.Metrics != nil {
		n.cfg.Metrics.AttestationRefused(string(re.Rule))
	}
	return err
}

// destEvidence returns the destination's verified MK, reusing evidence
// verified less than EvidenceMaxAge ago.
func (n *Node) destEvidence(ctx context.Context, peer Peer, dest string, res *Result) (verified, bool, error) {
	n.cacheMu.Lock()
	v, ok := n.cache[dest]
	n.cacheMu.Unlock()
	if ok && n.cfg.EvidenceMaxAge > 0 && n.cfg.Now().Sub(v.at) < n.cfg.EvidenceMaxAge {
		if n.stillEnrolled(ctx, dest, v.ak) {
			return v, true, nil
		}
		// dest's enrolment changed since (its TPM was replaced and it was
		// re-enrolled): evidence of the replaced TPM is never used again.
		n.cacheMu.Lock()
		if c, ok := n.cache[dest]; ok && bytes.Equal(c.ak, v.ak) {
			delete(n.cache, dest)
		}
		n.cacheMu.Unlock()
	}
	if n.cfg.Verifier == nil {
		return verified{}, false, fmt.Errorf("migrate to %s: %w: this host has no attestation policy configured, so it cannot verify any destination", dest, ErrRefused)
	}
	nonce, err := attest.NewNonce(n.cfg.Rand)
	if err != nil {
		return verified{}, false, err
	}
	res.RoundTrips.Before++
	resp, err := peer.Evidence(ctx, &EvidenceRequest{Version: ProtocolVersion, Nonce: nonce, PCRs: n.cfg.QuotePCRs, Source: n.cfg.Host})
	if err != nil {
		return verified{}, false, fmt.Errorf("migrate to %s: evidence: %w: %w", dest, ErrPeer, err)
	}
	ev, err := attest.DecodeEvidence(resp.Evidence)
	if err != nil {
		return verified{}, false, fmt.Errorf("migrate to %s: %w: %w", dest, ErrRefused, err)
	}
	// The evidence must name the host dialled, and its AK must be the one
	// enrolled for that host (rule enrolled-host).
	r, err := n.cfg.Verifier.VerifyHost(ctx, dest, ev, nonce)
	var re *attest.RefusalError
	if errors.As(err, &re) {
		return verified{}, false, fmt.Errorf("migrate to %s: %w: %w", dest, ErrRefused, err)
	}
	if err != nil {
		return verified{}, false, fmt.Errorf("migrate to %s: verify evidence: %w", dest, err)
	}
	v = verified{mkPublic: r.MKPublic, digest: digest(resp.Evidence), at: n.cfg.Now(), ak: r.AKName}
	n.cacheMu.Lock()
	n.cache[dest] = v
	n.cacheMu.Unlock()
	return v, false, nil
}

// stillEnrolled reports whether ak is still the AK enrolled for host (the
// latest record of its enrolment store; in registry mode the operator's
// record). A store that cannot tell, or fails, says no: the caller then
// verifies fresh evidence.
func (n *Node) stillEnrolled(ctx context.Context, host string, ak []byte) bool {
	if n.cfg.Verifier == nil || n.cfg.Verifier.Enrollments == nil || len(ak) == 0 {
		return false
	}
	e, err := attest.EnrolledHost(ctx, n.cfg.Verifier.Enrollments, host)
	return err == nil && e != nil && bytes.Equal(e.AKName, ak)
}

func (n *Node) wrap(tx Tx, v verified, keys map[string]vtpm.VMKey) (*PrepareRequest, error) {
	req, err := SealBatch(n.cfg.Rand, v.mkPublic, v.digest, tx.ID, n.cfg.Host, tx.Peer, tx.VMs, keys)
	if err == nil {
		req.KeyOnly = tx.KeyOnly
	}
	return req, err
}

// SealBatch builds the Prepare a source sends: one random transfer key
// wrapped for the destination's certified migration key (identity.Wrap,
// in software: no TPM), and each VM key under it, bound to the
// transaction, the VM, its new generation, both hosts and the digest of
// the evidence the source verified. A migration (Node.wrap) and a restore
// from escrow (migrate/recovery) both use it.
func SealBatch(rnd io.Reader, mkPublic, evidenceDigest []byte, txID, source, dest string, vms []TxVM, keys map[string]vtpm.VMKey) (*PrepareRequest, error) {
	tk := make([]byte, 32)
	defer wipe(tk)
	if _, err := io.ReadFull(rnd, tk); err != nil {
		return nil, err
	}
	wk, err := identity.Wrap(rnd, mkPublic, tk)
	if err != nil {
		return nil, err
	}
	sealer, err := transferSealer(tk, rnd)
	if err != nil {
		return nil, err
	}
	req := &PrepareRequest{Version: ProtocolVersion, TxID: txID, Source: source, Dest: dest,
		EvidenceDigest: evidenceDigest, TransferKey: *wk}
	for _, vm := range vms {
		k, ok := keys[vm.UUID]
		if !ok || !k.Valid() {
			return nil, fmt.Errorf("seal batch %s: no key for VM %s", txID, vm.UUID)
		}
		w, err := sealForTransfer(sealer, req, vm, k)
		if err != nil {
			return nil, err
		}
		req.VMs = append(req.VMs, w)
	}
	return req, nil
}

// checkProofs verifies that the destination holds exactly the keys sent,
// before the hypervisor moves anything.
func checkProofs(tx Tx, resp *PrepareResponse, keys map[string]vtpm.VMKey) error {
	for _, vm := range tx.VMs {
		want, err := keys[vm.UUID].Proof(KeyProofLabel(tx.ID, vm.UUID, vm.Generation))
		if err != nil {
			return err
		}
		if !hmac.Equal(want, resp.Proofs[vm.UUID]) {
			return fmt.Errorf("%w: VM %s: the destination's key proof does not match the key sent", ErrKeyProof, vm.UUID)
		}
	}
	return nil
}

func asRefusal(err error) (*attest.RefusalError, bool) {
	var re *attest.RefusalError
	ok := errors.As(err, &re)
	return re, ok
}

// refuse ends a transaction whose destination failed attestation.
func (n *Node) refuse(ctx context.Context, tx Tx, err error) {
	rule := ""
	var re *attest.RefusalError
	if errors.As(err, &re) {
		rule = string(re.Rule)
	}
	if n.cfg.Metrics != nil && rule != "" {
		n.cfg.Metrics.AttestationRefused(rule)
	}
	for _, vm := range tx.VMs {
		n.audit(ctx, AuditEvent{Event: audit.EventKeyReleaseRefused, VM: vm.UUID, Peer: tx.Peer, TxID: tx.ID, Rule: rule, Detail: err.Error()})
	}
	n.abortLocal(ctx, tx, err.Error())
	n.done(OutcomeRefused)
}

// abortLocal ends a transaction that never reached the destination, or
// that the destination dropped: the registry's transaction first, then the
// ledger's.
func (n *Node) abortLocal(ctx context.Context, tx Tx, reason string) {
	n.regAbort(ctx, tx, tx.VMs)
	if _, err := n.cfg.Ledger.SetState(tx.ID, SrcAborted, reason); err != nil {
		n.log.WithError(err).WithField("tx", tx.ID).Error("ledger: abort")
		return
	}
	n.settleStep(ctx, tx)
}

// abortRemote asks the destination to drop what it may hold. If it cannot
// be reached the transaction stays open: Reconcile finishes the abort.
func (n *Node) abortRemote(ctx context.Context, peer Peer, tx Tx, reason string) {
	ids := make([]string, 0, len(tx.VMs))
	for _, vm := range tx.VMs {
		ids = append(ids, vm.UUID)
	}
	_, err := peer.Finish(ctx, &FinishRequest{Version: ProtocolVersion, TxID: tx.ID, Source: n.cfg.Host, Abort: ids})
	if err != nil && !errors.Is(err, ErrUnknownTx) {
		n.log.WithError(err).WithField("tx", tx.ID).Warn("abort not confirmed by the destination; recovery will retry")
		return
	}
	n.abortLocal(ctx, tx, reason)
	for _, id := range ids {
		n.audit(ctx, AuditEvent{Event: audit.EventMigrationAbort, VM: id, Peer: tx.Peer, TxID: tx.ID, Detail: reason})
	}
}

// finishSource sends the outcome to the destination, then shreds the keys
// of the VMs that moved and closes the transaction. Idempotent.
func (n *Node) finishSource(ctx context.Context, peer Peer, tx Tx) error {
	fin := &FinishRequest{Version: ProtocolVersion, TxID: tx.ID, Source: n.cfg.Host, RegistryRev: n.registryRev(vmIDs(tx.VMs))}
	for _, vm := range tx.VMs {
		if vm.Outcome == OutcomeMigrated {
			fin.Commit = append(fin.Commit, vm.UUID)
		} else {
			fin.Abort = append(fin.Abort, vm.UUID)
		}
	}
	if _, err := peer.Finish(ctx, fin); err != nil {
		return fmt.Errorf("migrate %s: finish: %w: %w", tx.ID, ErrUnresolved, err)
	}
	if err := n.crash(SrcAfterFinish); err != nil {
		return err
	}
	return n.completeSource(ctx, tx)
}

func (n *Node) completeSource(ctx context.Context, tx Tx) error {
	final, result := SrcAborted, OutcomeAborted
	// The batch's ownership step: counted in the host TPM at the Begin
	// (anchor.go), or, after a restart settled that step, now, before any
	// key is shredded (one NV_Increment per batch). If it fails nothing
	// was shredded: the transaction stays open and recovery retries.
	var changes []vtpm.Change
	for _, vm := range tx.VMs {
		if vm.Outcome == OutcomeMigrated {
			changes = append(changes, vtpm.Change{VMID: vm.UUID})
		}
	}
	settle, err := n.sourceStep(ctx, tx, changes)
	if err != nil {
		return err
	}
	defer settle()
	for _, vm := range tx.VMs {
		if vm.Outcome != OutcomeMigrated {
			n.audit(ctx, AuditEvent{Event: audit.EventMigrationAbort, VM: vm.UUID, Peer: tx.Peer, TxID: tx.ID, Detail: vm.Error})
			continue
		}
		if err := n.cfg.Keys.Delete(ctx, vm.UUID); err != nil && !errors.Is(err, vtpm.ErrKeyNotFound) {
			return fmt.Errorf("migrate %s: shred source key of %s: %w", tx.ID, vm.UUID, err)
		}
		// The VM left: its secret has no business here any more. The node
		// owns it (secrets.go); the hypervisor's Migrate leaves it, and a
		// hook-mode migration (plain virsh) or a crash reaches here too.
		if err := n.undefineSecret(ctx, vm.UUID); err != nil {
			n.log.WithError(err).WithField("vm", vm.UUID).Warn("undefining the vTPM secret of a VM that left")
		}
		n.audit(ctx, AuditEvent{Event: audit.EventMigrationCommit, VM: vm.UUID, Peer: tx.Peer, TxID: tx.ID, Generation: vm.Generation})
		final, result = SrcCommitted, OutcomeCommitted
	}
	if _, err := n.cfg.Ledger.SetState(tx.ID, final, ""); err != nil {
		return err
	}
	n.done(result)
	return nil
}
