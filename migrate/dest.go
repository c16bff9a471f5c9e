package migrate

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// Evidence produces this host's evidence over the source's nonce:
// Certify, Quote and PCR_Read on the TPM (the identity is loaded once).
func (n *Node) Evidence(ctx context.Context, req *EvidenceRequest) (*EvidenceResponse, error) {
	if req.Version != ProtocolVersion || len(req.Nonce) < attest.MinNonceSize || len(req.Nonce) > attest.MaxNonceSize {
		return nil, fmt.Errorf("evidence: %w: version %d, nonce of %d bytes", ErrBadMessage, req.Version, len(req.Nonce))
	}
	if err := checkPCRs(req.PCRs); err != nil {
		return nil, fmt.Errorf("evidence: %w", err)
	}
	if err := n.authorizePeer(ctx, "evidence", req.Source); err != nil {
		return nil, err
	}
	pcrs := req.PCRs
	if len(pcrs) == 0 {
		pcrs = n.cfg.QuotePCRs
	}
	n.tpmMu.Lock()
	ev, err := identity.Produce(ctx, n.cfg.TPM, identity.ProduceOptions{
		HostID: n.cfg.Host, Nonce: req.Nonce, PCRs: pcrs, EventLog: n.cfg.EventLog, Identity: n.cfg.Identity, Now: n.cfg.Now,
	})
	n.tpmMu.Unlock()
	if errors.Is(err, identity.ErrBadOptions) {
		return nil, fmt.Errorf("evidence: %w: %w", ErrBadMessage, err)
	}
	if err != nil {
		return nil, fmt.Errorf("evidence: %w: %w", ErrDestTPM, err)
	}
	b, err := ev.Encode()
	if err != nil {
		return nil, err
	}
	return &EvidenceResponse{Evidence: b}, nil
}

// Prepare receives a batch: it authorises it (authz.go: nothing is
// written before), persists the transaction, unwraps the transfer key in
// the TPM (Import, Load, Unseal, Flush: once per batch), stores every VM
// key as PENDING under the vault, defines each VM's vTPM secret on the
// hypervisor, and only then acknowledges. A failure undoes only what this
// transaction created.
func (n *Node) Prepare(ctx context.Context, req *PrepareRequest) (*PrepareResponse, error) {
	if err := req.validate(); err != nil {
		return nil, fmt.Errorf("prepare: %w", err)
	}
	if req.Dest != n.cfg.Host {
		return nil, fmt.Errorf("prepare: %w: addressed to %s, this is %s", ErrBadMessage, req.Dest, n.cfg.Host)
	}
	if err := n.authorizePrepare(ctx, req); err != nil {
		n.log.WithError(err).WithFields(logrus.Fields{"tx": req.TxID, "source": req.Source}).Warn("prepare refused")
		return nil, err
	}
	return n.accept(ctx, req, nil)
}

// accept is an authorised Prepare's work (a migration's, or a restore's
// with the VMs' states to stage): ledger, unwrap, pending keys, states,
// secrets, proofs.
func (n *Node) accept(ctx context.Context, req *PrepareRequest, states []RestoredState) (*PrepareResponse, error) {
	log := n.log.WithFields(logrus.Fields{"tx": req.TxID, "source": req.Source})
	tx := Tx{ID: req.TxID, Role: RoleDestination, Peer: req.Source, State: DstPending, Restore: states != nil, KeyOnly: req.KeyOnly}
	for _, w := range req.VMs {
		tx.VMs = append(tx.VMs, TxVM{UUID: w.UUID, Name: w.Name, Generation: w.Generation})
	}
	if err := n.cfg.Ledger.Begin(tx); err != nil {
		return nil, fmt.Errorf("prepare: %w", storageErr(err))
	}
	if err := n.crash(DstAfterLedger); err != nil {
		return nil, err
	}
	// made records what this transaction created, so that a failure undoes
	// that and nothing else.
	made := map[string]bool{}
	n.tpmMu.Lock()
	tk, err := identity.Unwrap(ctx, n.cfg.TPM, n.cfg.Identity.MK, &req.TransferKey, identity.UnwrapOptions{})
	n.tpmMu.Unlock()
	if err != nil {
		n.abortDest(ctx, tx, fmt.Sprintf("unwrap transfer key: %v", err), made)
		return nil, fmt.Errorf("prepare %s: %w: unwrap the transfer key: %w", req.TxID, ErrDestTPM, err)
	}
	sealer, err := transferSealer(tk, nil)
	wipe(tk)
	if err != nil {
		n.abortDest(ctx, tx, err.Error(), made)
		return nil, err
	}
	keys := make([]vtpm.VMKey, 0, len(req.VMs))
	defer func() {
		for _, k := range keys {
			k.Destroy()
		}
	}()
	for _, w := range req.VMs {
		k, err := openFromTransfer(sealer, req, w)
		if err == nil {
			keys = append(keys, k)
			err = storageErr(n.cfg.Keys.PutPending(ctx, w.UUID, req.TxID, w.Generation, k))
		}
		if err != nil {
			n.abortDest(ctx, tx, fmt.Sprintf("VM %s: %v", w.UUID, err), made)
			return nil, fmt.Errorf("prepare %s: VM %s: %w", req.TxID, w.UUID, err)
		}
	}
	for _, st := range states {
		if err := n.stageState(ctx, req.TxID, st); err != nil {
			n.abortDest(ctx, tx, fmt.Sprintf("stage the vTPM state of %s: %v", st.UUID, err), made)
			return nil, fmt.Errorf("prepare %s: stage the vTPM state of %s: %w", req.TxID, st.UUID, storageErr(err))
		}
	}
	if err := n.crash(DstAfterKeys); err != nil {
		return nil, err
	}
	for i, w := range req.VMs {
		// Marked before the call: a failed define may have replaced the
		// value, and the abort then removes what this transaction wrote.
		made[w.UUID] = true
		if err := n.defineSecret(ctx, w.UUID, keys[i]); err != nil {
			n.abortDest(ctx, tx, fmt.Sprintf("define secret of %s: %v", w.UUID, err), made)
			return nil, fmt.Errorf("prepare %s: define vTPM secret of %s: %w", req.TxID, w.UUID, err)
		}
	}
	if err := n.crash(DstAfterSecrets); err != nil {
		return nil, err
	}
	resp := &PrepareResponse{TxID: req.TxID, Proofs: map[string][]byte{}}
	for i, w := range req.VMs {
		proof, err := keys[i].Proof(KeyProofLabel(req.TxID, w.UUID, w.Generation))
		if err != nil {
			n.abortDest(ctx, tx, err.Error(), made)
			return nil, err
		}
		resp.Proofs[w.UUID] = proof
		resp.Accepted = append(resp.Accepted, w.UUID)
		detail := ""
		if states != nil {
			detail = fmt.Sprintf("restored from escrow bundle %s, relayed by %s", states[i].Bundle, req.Source)
		}
		n.audit(ctx, AuditEvent{Event: audit.EventKeyReceived, VM: w.UUID, Peer: req.Source, TxID: req.TxID, Generation: w.Generation, Detail: detail})
	}
	log.WithField("vms", len(req.VMs)).Info("keys pending")
	return resp, nil
}

// Finish commits or aborts a transaction, per VM. It is idempotent: a
// transaction already final answers with its state.
func (n *Node) Finish(ctx context.Context, req *FinishRequest) (*FinishResponse, error) {
	if err := req.validate(); err != nil {
		return nil, fmt.Errorf("finish: %w", err)
	}
	if err := n.authorizePeer(ctx, "finish", req.Source); err != nil {
		return nil, err
	}
	tx, err := n.cfg.Ledger.Get(req.TxID)
	if err != nil {
		return nil, fmt.Errorf("finish: %w", err)
	}
	if err := n.authorizeFinish(ctx, req, tx); err != nil {
		return nil, err
	}
	if tx.State.Final() {
		return finishResponse(tx), nil
	}
	if n.cfg.Registry != nil && len(req.Commit) > 0 {
		if err := n.registryShowsMine(ctx, tx, req.Commit, req.RegistryRev); err != nil {
			return nil, fmt.Errorf("finish %s: %w", req.TxID, err)
		}
	}
	return n.finishDest(ctx, tx, req.Commit, req.Abort)
}

// registryShowsMine checks, before a destination promotes PENDING keys,
// that the registry shows this host as the owner of each VM at the
// generation of the transaction (the source's Commit happened): from the
// last view once it reached rev, else with one read. Otherwise the keys
// stay PENDING and the transaction open (the source or recovery retries).
func (n *Node) registryShowsMine(ctx context.Context, tx Tx, commit []string, rev int64) error {
	gens := map[string]uint64{}
	for _, vm := range tx.VMs {
		gens[vm.UUID] = vm.Generation
	}
	mine := func(v registry.View) error {
		for _, id := range commit {
			r, ok := v.VMs[id]
			switch {
			case !ok:
				return fmt.Errorf("%w: VM %s is not in the registry (rule registry-commit)", ErrRegistryRefused, id)
			case r.Owner != n.cfg.Host || r.Generation != gens[id]:
				return fmt.Errorf("%w: VM %s: the registry shows %s at generation %d, not %s at %d: the source has not committed (rule registry-commit)",
					ErrRegistryRefused, id, r.Owner, r.Generation, n.cfg.Host, gens[id])
			}
		}
		return nil
	}
	v, err := n.registryView(ctx, commit, rev, func(v registry.View) bool { return mine(v) == nil })
	if err != nil {
		if !v.Stale || mine(v) != nil {
			return err
		}
		n.log.WithError(err).WithField("tx", tx.ID).Warn("registry unavailable: promoting by this host's last view, which shows the commit")
	}
	return mine(v)
}

func finishResponse(tx Tx) *FinishResponse {
	r := &FinishResponse{TxID: tx.ID, State: tx.State}
	for _, vm := range tx.VMs {
		if vm.Outcome == OutcomeCommitted {
			r.Committed = append(r.Committed, vm.UUID)
		} else {
			r.Aborted = append(r.Aborted, vm.UUID)
		}
	}
	return r
}

func (n *Node) finishDest(ctx context.Context, tx Tx, commit, abort []string) (*FinishResponse, error) {
	// One finish of a transaction at a time; the second sees it final.
	// (Both advancing the anchor at once failed the source's Finish with
	// "unsettled anchor change" on the lab while recovery committed.)
	mu, _ := n.finishing.LoadOrStore(tx.ID, &sync.Mutex{})
	mu.(*sync.Mutex).Lock()
	defer mu.(*sync.Mutex).Unlock()
	if cur, err := n.cfg.Ledger.Get(tx.ID); err == nil {
		if cur.State.Final() {
			n.finishing.Delete(tx.ID)
			return finishResponse(cur), nil
		}
		tx = cur
	}
	outcome := map[string]Outcome{}
	// The batch's ownership step, counted in the host TPM before any
	// pending key becomes active (one NV_Increment per batch).
	var changes []vtpm.Change
	for _, vm := range tx.VMs {
		if slices.Contains(commit, vm.UUID) {
			changes = append(changes, vtpm.Change{VMID: vm.UUID, Generation: vm.Generation})
		}
	}
	settle, err := n.advance(ctx, tx, changes)
	if err != nil {
		return nil, err
	}
	defer settle()
	for _, vm := range tx.VMs {
		switch {
		case slices.Contains(commit, vm.UUID):
			// Never replace an active key this transaction did not create,
			// except a superseded copy a restore replaces (authorizeVM).
			if _, gen, err := n.cfg.Keys.Get(ctx, vm.UUID); err == nil && gen != vm.Generation {
				if !tx.Restore || gen >= vm.Generation {
					return nil, fmt.Errorf("finish %s: commit %s: %w: %s holds the VM's active key at generation %d; refusing to replace it with generation %d",
						tx.ID, vm.UUID, vtpm.ErrKeyExists, n.cfg.Host, gen, vm.Generation)
				}
				n.log.WithFields(logrus.Fields{"tx": tx.ID, "vm": vm.UUID, "old": gen, "new": vm.Generation}).Warn("restore: replacing this host's superseded copy of the VM's key")
			}
			// A restore's vTPM state goes into place before its key
			// becomes active (nothing staged: a migration, a no-op).
			if err := n.placeState(ctx, tx.ID, vm.UUID); err != nil {
				return nil, fmt.Errorf("finish %s: commit %s: %w", tx.ID, vm.UUID, err)
			}
			if _, err := n.cfg.Keys.CommitPending(ctx, vm.UUID, tx.ID); err != nil {
				// Already promoted before a crash?
				if _, gen, gerr := n.cfg.Keys.Get(ctx, vm.UUID); !errors.Is(err, vtpm.ErrKeyNotFound) || gerr != nil || gen != vm.Generation {
					return nil, fmt.Errorf("finish %s: commit %s: %w", tx.ID, vm.UUID, err)
				}
			}
			outcome[vm.UUID] = OutcomeCommitted
		case slices.Contains(abort, vm.UUID):
			if err := n.dropVM(ctx, tx, vm.UUID, true); err != nil {
				return nil, err
			}
			outcome[vm.UUID] = OutcomeAborted
		}
	}
	if err := n.crash(DstAfterCommit); err != nil {
		return nil, err
	}
	final, err := n.cfg.Ledger.Update(tx.ID, func(t *Tx) error {
		t.State = DstAborted
		for i := range t.VMs {
			if o, ok := outcome[t.VMs[i].UUID]; ok {
				t.VMs[i].Outcome = o
			}
			if t.VMs[i].Outcome == OutcomeCommitted {
				t.State = DstCommitted
			}
		}
		for _, vm := range t.VMs {
			if vm.Outcome == "" {
				return fmt.Errorf("finish %s: %w: VM %s neither committed nor aborted", t.ID, ErrBadMessage, vm.UUID)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	defer n.finishing.Delete(tx.ID) // final: a later finish reads it from the ledger
	for _, vm := range final.VMs {
		ev := audit.EventMigrationAbort
		if vm.Outcome == OutcomeCommitted {
			ev = audit.EventMigrationCommit
		}
		n.audit(ctx, AuditEvent{Event: ev, VM: vm.UUID, Peer: tx.Peer, TxID: tx.ID, Generation: vm.Generation})
	}
	n.log.WithFields(logrus.Fields{"tx": tx.ID, "state": final.State}).Info("transaction finished")
	return finishResponse(final), nil
}

// dropVM shreds the VM's pending key of this transaction and, when secret
// is set (the transaction defined it), undefines its secret, unless the VM
// runs here or is paused here (an incoming migration's VM is paused until
// the hypervisor commits it: model F6): then its secret is in use and the
// source must not abort it. The secret stays when this host holds an
// active key of the VM (or one it cannot read): then the secret is the
// owner's, not this transaction's.
func (n *Node) dropVM(ctx context.Context, tx Tx, vm string, secret bool) error {
	d, err := n.cfg.Hypervisor.Domain(ctx, vm)
	if err == nil && (d.State == hypervisor.StateRunning || d.State == hypervisor.StatePaused) {
		return fmt.Errorf("abort %s: VM %s is %s on %s: refusing to drop its key", tx.ID, vm, d.State, n.cfg.Host)
	}
	if err := n.cfg.Keys.DropPending(ctx, vm, tx.ID); err != nil {
		return err
	}
	if n.cfg.States != nil {
		if err := n.cfg.States.Drop(ctx, tx.ID, vm); err != nil {
			return err
		}
	}
	if !secret {
		return nil
	}
	if _, _, err := n.cfg.Keys.Get(ctx, vm); !errors.Is(err, vtpm.ErrKeyNotFound) {
		n.log.WithFields(logrus.Fields{"tx": tx.ID, "vm": vm}).Warn("abort: this host holds the VM's key; its secret is the owner's and stays")
		return nil
	}
	return n.undefineSecret(ctx, vm)
}

// abortDest undoes a Prepare that failed here: the pending keys this
// transaction stored (the key store's file of this transaction) and the
// secrets it defined (made), nothing else.
func (n *Node) abortDest(ctx context.Context, tx Tx, reason string, made map[string]bool) {
	for _, vm := range tx.VMs {
		if err := n.dropVM(ctx, tx, vm.UUID, made[vm.UUID]); err != nil {
			n.log.WithError(err).Error("abort: drop VM")
		}
	}
	if _, err := n.cfg.Ledger.Update(tx.ID, func(t *Tx) error {
		t.State, t.Reason = DstAborted, reason
		for i := range t.VMs {
			t.VMs[i].Outcome = OutcomeAborted
		}
		return nil
	}); err != nil {
		n.log.WithError(err).Error("ledger: abort")
	}
}

// Status reports this host's view of a transaction, for the peer's recovery.
// It answers enrolled hosts only, and reports only the VMs of a
// transaction with the asking host.
func (n *Node) Status(ctx context.Context, req *StatusRequest) (*StatusResponse, error) {
	if !txIDRE.MatchString(req.TxID) || len(req.VMs) > 4096 {
		return nil, fmt.Errorf("status: %w: transaction id or %d VMs", ErrBadMessage, len(req.VMs))
	}
	if err := n.authorizePeer(ctx, "status", req.From); err != nil {
		return nil, err
	}
	resp := &StatusResponse{TxID: req.TxID}
	vms := req.VMs // unknown: the orphaned domains, for the source's recovery (Stopped)
	if tx, err := n.cfg.Ledger.Get(req.TxID); err == nil {
		if tx.Peer != req.From {
			return nil, deny("status", req.From, "", RuleTxPeer, "transaction %s is not a transaction with %s", req.TxID, req.From)
		}
		resp.Known, resp.State = true, tx.State
		vms = statusVMs(tx, req.VMs)
	} else if !errors.Is(err, ErrUnknownTx) {
		return nil, err
	}
	var held map[string]uint64 // one listing of the key store's headers, no key opened
	if len(req.VMs) > 0 {
		var err error
		if held, err = n.heldGenerations(ctx); err != nil {
			return nil, fmt.Errorf("status: %w", err)
		}
	}
	for _, vm := range vms {
		d, err := n.cfg.Hypervisor.Domain(ctx, vm)
		switch {
		case err != nil || d.State == hypervisor.StateAbsent:
		case d.State == hypervisor.StateRunning:
			if resp.Known {
				resp.Running = append(resp.Running, vm)
			}
		case d.State != hypervisor.StatePaused && (resp.Known || n.orphan(vm, held)):
			resp.Stopped = append(resp.Stopped, vm)
		}
	}
	for _, vm := range req.VMs {
		if g, ok := held[vm]; ok {
			if resp.Held == nil {
				resp.Held = map[string]uint64{}
			}
			resp.Held[vm] = g
		}
	}
	return resp, nil
}

// orphan reports whether this host holds no key of the VM, active (held:
// heldGenerations, which fails on an envelope it cannot read) or PENDING: an unknown transaction's Status reports only such a domain
// (one this host cannot start), so an enrolled peer learns nothing about
// the VMs this host owns or receives.
func (n *Node) orphan(vm string, held map[string]uint64) bool {
	_, active := held[vm]
	_, pending := n.Incoming(vm)
	return !active && !pending
}
