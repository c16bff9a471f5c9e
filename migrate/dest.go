package migrate

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// Evidence produces this host's evidence over the source's nonce:
// Certify, Quote and PCR_Read on the TPM (the identity is loaded once).
func (n *Node) Evidence(ctx context.Context, req *EvidenceRequest) (*EvidenceResponse, error) {
	if req.Version != ProtocolVersion || len(req.Nonce) < attest.MinNonceSize || len(req.Nonce) > attest.MaxNonceSize {
		return nil, fmt.Errorf("evidence: %w: version %d, nonce of %d bytes", ErrBadMessage, req.Version, len(req.Nonce))
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
	if err != nil {
		return nil, fmt.Errorf("evidence: %w", err)
	}
	b, err := ev.Encode()
	if err != nil {
		return nil, err
	}
	return &EvidenceResponse{Evidence: b}, nil
}

// Prepare receives a batch: it persists the transaction, unwraps the
// transfer key in the TPM (Import, Load, Unseal, Flush: once per batch),
// stores every VM key as PENDING under the vault, defines each VM's vTPM
// secret on the hypervisor, and only then acknowledges.
func (n *Node) Prepare(ctx context.Context, req *PrepareRequest) (*PrepareResponse, error) {
	if err := req.validate(); err != nil {
		return nil, fmt.Errorf("prepare: %w", err)
	}
	if req.Dest != n.cfg.Host {
		return nil, fmt.Errorf("prepare: %w: addressed to %s, this is %s", ErrBadMessage, req.Dest, n.cfg.Host)
	}
	log := n.log.WithFields(logrus.Fields{"tx": req.TxID, "source": req.Source})
	tx := Tx{ID: req.TxID, Role: RoleDestination, Peer: req.Source, State: DstPending}
	for _, w := range req.VMs {
		tx.VMs = append(tx.VMs, TxVM{UUID: w.UUID, Name: w.Name, Generation: w.Generation})
	}
	if err := n.cfg.Ledger.Begin(tx); err != nil {
		return nil, fmt.Errorf("prepare: %w", err)
	}
	if err := n.crash(DstAfterLedger); err != nil {
		return nil, err
	}
	n.tpmMu.Lock()
	tk, err := identity.Unwrap(ctx, n.cfg.TPM, n.cfg.Identity.MK, &req.TransferKey, identity.UnwrapOptions{})
	n.tpmMu.Unlock()
	if err != nil {
		n.abortDest(ctx, tx, fmt.Sprintf("unwrap transfer key: %v", err))
		return nil, fmt.Errorf("prepare %s: %w", req.TxID, err)
	}
	sealer, err := transferSealer(tk, nil)
	wipe(tk)
	if err != nil {
		n.abortDest(ctx, tx, err.Error())
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
			err = n.cfg.Keys.PutPending(ctx, w.UUID, req.TxID, w.Generation, k)
		}
		if err != nil {
			n.abortDest(ctx, tx, fmt.Sprintf("VM %s: %v", w.UUID, err))
			return nil, fmt.Errorf("prepare %s: VM %s: %w", req.TxID, w.UUID, err)
		}
	}
	if err := n.crash(DstAfterKeys); err != nil {
		return nil, err
	}
	for i, w := range req.VMs {
		if err := n.defineSecret(ctx, w.UUID, keys[i]); err != nil {
			n.abortDest(ctx, tx, fmt.Sprintf("define secret of %s: %v", w.UUID, err))
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
			n.abortDest(ctx, tx, err.Error())
			return nil, err
		}
		resp.Proofs[w.UUID] = proof
		resp.Accepted = append(resp.Accepted, w.UUID)
		n.audit(ctx, AuditEvent{Event: audit.EventKeyReceived, VM: w.UUID, Peer: req.Source, TxID: req.TxID, Generation: w.Generation})
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
	tx, err := n.cfg.Ledger.Get(req.TxID)
	if err != nil {
		return nil, fmt.Errorf("finish: %w", err)
	}
	if tx.Role != RoleDestination || tx.Peer != req.Source {
		return nil, fmt.Errorf("finish %s: %w: transaction belongs to %s as %s", req.TxID, ErrBadMessage, tx.Peer, tx.Role)
	}
	if tx.State.Final() {
		return finishResponse(tx), nil
	}
	return n.finishDest(ctx, tx, req.Commit, req.Abort)
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
	outcome := map[string]Outcome{}
	for _, vm := range tx.VMs {
		switch {
		case slices.Contains(commit, vm.UUID):
			if _, err := n.cfg.Keys.CommitPending(ctx, vm.UUID, tx.ID); err != nil {
				// Already promoted before a crash?
				if _, gen, gerr := n.cfg.Keys.Get(ctx, vm.UUID); !errors.Is(err, vtpm.ErrKeyNotFound) || gerr != nil || gen != vm.Generation {
					return nil, fmt.Errorf("finish %s: commit %s: %w", tx.ID, vm.UUID, err)
				}
			}
			outcome[vm.UUID] = OutcomeCommitted
		case slices.Contains(abort, vm.UUID):
			if err := n.dropVM(ctx, tx, vm.UUID); err != nil {
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

// dropVM shreds a VM's pending key and undefines its secret, unless the VM
// runs here (then its secret is in use and the source must not abort it).
func (n *Node) dropVM(ctx context.Context, tx Tx, vm string) error {
	d, err := n.cfg.Hypervisor.Domain(ctx, vm)
	if err == nil && d.State == hypervisor.StateRunning {
		return fmt.Errorf("abort %s: VM %s runs on %s: refusing to drop its key", tx.ID, vm, n.cfg.Host)
	}
	if err := n.cfg.Keys.DropPending(ctx, vm, tx.ID); err != nil {
		return err
	}
	return n.undefineSecret(ctx, vm)
}

// abortDest undoes a Prepare that failed here.
func (n *Node) abortDest(ctx context.Context, tx Tx, reason string) {
	for _, vm := range tx.VMs {
		if err := n.dropVM(ctx, tx, vm.UUID); err != nil {
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
func (n *Node) Status(ctx context.Context, req *StatusRequest) (*StatusResponse, error) {
	if !txIDRE.MatchString(req.TxID) {
		return nil, fmt.Errorf("status: %w: transaction id", ErrBadMessage)
	}
	resp := &StatusResponse{TxID: req.TxID}
	if tx, err := n.cfg.Ledger.Get(req.TxID); err == nil {
		if tx.Peer != req.From {
			return nil, fmt.Errorf("status %s: %w: not a transaction with %s", req.TxID, ErrBadMessage, req.From)
		}
		resp.Known, resp.State = true, tx.State
	} else if !errors.Is(err, ErrUnknownTx) {
		return nil, err
	}
	for _, vm := range req.VMs {
		if d, err := n.cfg.Hypervisor.Domain(ctx, vm); err == nil && d.State == hypervisor.StateRunning {
			resp.Running = append(resp.Running, vm)
		}
	}
	return resp, nil
}
