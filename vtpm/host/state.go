package host

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
)

// The state checks of Open (docs/anchor.md, "What vtpmd calls"): after the
// vault file was checked (vtpm.CheckVaultFile) and the vault opened,
//
//  1. every key envelope is checked (KeyStore.CheckKeys): a damaged one
//     marks its VM damaged and leaves the others usable;
//  2. the rollback anchor is opened and checked against the host TPM (one
//     NV_Read): a data directory restored from a backup (RollbackError), a
//     subset of envelopes restored or deleted (AnchorMismatchError), a
//     forged or missing anchor file refuse the Open, naming what happened
//     and how to recover ('vtpmd anchor accept'); a host initialised before
//     the anchor existed is anchored once, with what it holds;
//  3. unsettled anchor steps (a crash between an ownership step and its
//     settling) are settled from the key store;
//  4. a rekey a crash interrupted, of a VM whose state this host keeps, is
//     recovered (committed or dropped, swtpm.RecoverRekey).
//
// The ledger and the audit log are the daemon's (cmd/vtpmd/daemon checks
// them with the anchor's history).

func (h *Host) openState(ctx context.Context) error {
	checks, err := h.keys.CheckKeys(ctx)
	if err != nil {
		return err
	}
	for _, c := range checks {
		if c.Damaged {
			h.log.WithFields(logrus.Fields{"vm": c.VMID, "file": c.File, "reason": c.Reason}).
				Error("VM key envelope damaged: the VM cannot start until it is restored; every other VM is usable")
		}
	}
	facts := vtpm.FactsFromChecks(checks)
	acfg := h.cfg.anchorConfig(h.opts.Now)
	a, err := vtpm.OpenAnchor(ctx, h.meter, h.vault, acfg)
	if errors.Is(err, vtpm.ErrAnchorNotInitialized) {
		// No anchor file and no index: a host initialised before the
		// anchor existed. Anchor what it holds now, once.
		h.log.WithField("holdings", len(facts.Holdings)).Warn("this host has no rollback anchor yet: defining it in the host TPM with the VMs it holds now")
		a, err = vtpm.InitAnchor(ctx, h.meter, h.vault, acfg, facts, vtpm.AnchorInitOptions{})
	}
	if err != nil {
		return err
	}
	st, err := a.Check(ctx, facts)
	if err != nil {
		a.Close()
		return err
	}
	if len(st.Pending) > 0 {
		if err := a.SettleAll(ctx, facts); err != nil {
			a.Close()
			return err
		}
	}
	h.log.WithFields(logrus.Fields{"anchor_counter": st.Counter, "advances": st.Advances, "repaired": st.Repaired,
		"unsettled": len(st.Pending), "damaged": len(st.Damaged)}).Info("rollback anchor checked")
	h.anchor, h.checks = a, checks
	return h.recoverRekeys(ctx)
}

// recoverRekeys finishes or undoes a rekey a crash interrupted, for the VMs
// whose vTPM state this host keeps (Layout.VMState).
func (h *Host) recoverRekeys(ctx context.Context) error {
	ents, err := os.ReadDir(h.layout.VMs())
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range ents {
		if vtpm.CheckVMID(e.Name()) != nil {
			continue
		}
		if err := h.RecoverRekey(ctx, e.Name(), h.layout.VMState(e.Name())); err != nil {
			return err
		}
	}
	return nil
}

// Anchor is the host's rollback anchor.
func (h *Host) Anchor() *vtpm.Anchor { return h.anchor }

// KeyChecks returns the key store's per-VM checks made when the host
// opened (damaged envelopes among them).
func (h *Host) KeyChecks() []vtpm.KeyCheck { return h.checks }

// Advance records an ownership step in the rollback anchor before the key
// store changes: one NV_Increment (migrate.Anchor).
func (h *Host) Advance(ctx context.Context, changes []vtpm.Change) (vtpm.AnchorTicket, error) {
	return h.anchor.Advance(ctx, changes)
}

// Settle records how the key store ended a step, with the audit log's
// position when mark is set (no TPM command).
func (h *Host) Settle(ctx context.Context, t vtpm.AnchorTicket, mark *vtpm.AuditMark) error {
	facts, err := h.keys.Facts(ctx)
	if err != nil {
		return err
	}
	if mark != nil {
		h.anchor.SetAuditMark(*mark)
	}
	return h.anchor.Settle(ctx, t, facts)
}

// AcceptOptions is an acceptance of the data directory (AcceptAnchor).
type AcceptOptions struct {
	vtpm.AnchorAcceptance
	// CheckHistory, when set, is given the history the old anchor file
	// recorded (whether it counted ownership steps, the audit log's
	// position) before anything changes, when the file reads and
	// ResetHistory is not set; an error refuses the acceptance (the daemon
	// checks its ledger and audit log against it).
	CheckHistory func(hadHistory bool, mark *vtpm.AuditMark) error
}

// AcceptAnchor is 'vtpmd anchor accept': the explicit, audited acceptance
// of the data directory as it is after a refusal (docs/anchor.md,
// "Recovery"). It opens the TPM and the vault, reads the key store's facts
// and rewrites the anchor file to the TPM's counter (one NV_Read) once
// acc.Audit stored the record. vtpmd must not be running.
func AcceptAnchor(ctx context.Context, cfg Config, opts Options, acc AcceptOptions) (vtpm.AnchorAcceptRecord, error) {
	opts = opts.withDefaults()
	if err := cfg.Validate(); err != nil {
		return vtpm.AnchorAcceptRecord{}, err
	}
	if err := checkHostRecord(cfg); err != nil {
		return vtpm.AnchorAcceptRecord{}, err
	}
	if err := vtpm.CheckVaultFile(cfg.DataDir); err != nil {
		return vtpm.AnchorAcceptRecord{}, fmt.Errorf("accept anchor: %w", err)
	}
	m, err := OpenTPM(ctx, cfg, opts)
	if err != nil {
		return vtpm.AnchorAcceptRecord{}, fmt.Errorf("accept anchor: %w", err)
	}
	defer m.Close()
	v, err := vtpm.OpenVault(ctx, m, cfg.vaultConfig())
	if err != nil {
		return vtpm.AnchorAcceptRecord{}, fmt.Errorf("accept anchor: %w", err)
	}
	defer v.Close()
	ks, err := vtpm.NewKeyStore(cfg.DataDir, cfg.HostID, v, opts.Rand)
	if err != nil {
		return vtpm.AnchorAcceptRecord{}, err
	}
	checks, err := ks.CheckKeys(ctx)
	if err != nil {
		return vtpm.AnchorAcceptRecord{}, err
	}
	acfg := cfg.anchorConfig(opts.Now)
	if acc.CheckHistory != nil && !acc.ResetHistory {
		if old, err := vtpm.OpenAnchor(ctx, m, v, acfg); err == nil {
			err = acc.CheckHistory(old.Advances() > 0, old.AuditMark())
			old.Close()
			if err != nil {
				return vtpm.AnchorAcceptRecord{}, fmt.Errorf("accept anchor: %w (move the file aside as evidence and accept with --history-lost)", err)
			}
		}
	}
	a, rec, err := vtpm.AcceptAnchorState(ctx, m, v, acfg, vtpm.FactsFromChecks(checks), acc.AnchorAcceptance)
	if err != nil {
		return vtpm.AnchorAcceptRecord{}, err
	}
	a.Close()
	opts.Log.WithFields(logrus.Fields{"operator": rec.Operator, "counter": rec.TPMCounter, "differed": len(rec.Diffs)}).Warn(rec.String())
	return rec, nil
}

// RecoverRekey finishes or undoes an interrupted rekey of the VM whose vTPM
// state is stateDir (swtpm.RecoverRekey): it commits the new key when the
// state opens with it, drops it otherwise. A VM without a pending rekey is
// left alone.
func (h *Host) RecoverRekey(ctx context.Context, vm, stateDir string) error {
	if _, err := os.Stat(stateDir); err != nil && !swtpm.RekeyLeftovers(stateDir) {
		return nil
	}
	newKey, err := swtpm.RecoverRekey(ctx, stateDir)
	if err != nil {
		return fmt.Errorf("recover the rekey of VM %s: %w", vm, err)
	}
	if newKey {
		if err := h.keys.CommitRekey(ctx, vm); err != nil {
			return fmt.Errorf("recover the rekey of VM %s: %w", vm, err)
		}
		if err := swtpm.FinishRekey(ctx, stateDir); err != nil {
			return fmt.Errorf("recover the rekey of VM %s: %w", vm, err)
		}
		h.log.WithField("vm", vm).Warn("finished a rekey a crash interrupted: the new key opens the vTPM state")
		return nil
	}
	return h.keys.DropRekey(ctx, vm)
}
