package inproc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vtpmm/vtpmm/vtpm/emuhost"
	"github.com/vtpmm/vtpmm/vtpm/host"
)

// ReplaceTPM brings a host that lost its TPM (LoseTPM) back with a new
// one of the same make: a new TPM (new EK and AK) whose EK certificate
// chains to the same manufacturer CA, booted with the same log. As an
// operator does, it moves the data directory aside (the vault, keys,
// anchor and ledger were sealed to the dead TPM; the registry member's
// data, not sealed to anything, stays), runs 'vtpmd init' on the new TPM
// and starts vtpmd, which registers its new identity in the fleet
// registry. Its enrolment still names the old TPM until the operator
// re-enrols it (vtpmctl host reenroll).
func (h *Host) ReplaceTPM(ctx context.Context) error {
	if h.daemon() != nil {
		return fmt.Errorf("inproc: %s still runs on its TPM; LoseTPM first", h.name)
	}
	emu, err := emuhost.Start(ctx, emuhost.Config{Dir: h.emu.Dir(), Name: h.name})
	if err != nil {
		return fmt.Errorf("inproc: %s's new TPM: %w", h.name, err)
	}
	log, err := os.ReadFile(h.cfg.EventLog)
	if err == nil {
		err = emu.Boot(ctx, log)
	}
	if err != nil {
		_ = emu.Stop(ctx)
		return fmt.Errorf("inproc: boot %s's new TPM: %w", h.name, err)
	}
	h.emu = emu
	h.cfg.TPM = emu.URI()
	dead := h.cfg.DataDir + ".dead-tpm"
	if err := os.Rename(h.cfg.DataDir, dead); err != nil {
		return err
	}
	if err := os.MkdirAll(h.cfg.DataDir, 0o700); err != nil {
		return err
	}
	if err := os.Rename(filepath.Join(dead, "registry"), filepath.Join(h.cfg.DataDir, "registry")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if _, err := host.Init(ctx, h.cfg.Config, host.Options{}, host.InitOptions{}); err != nil {
		return fmt.Errorf("inproc: vtpmd init on %s's new TPM: %w", h.name, err)
	}
	h.dying.Store(false)
	return h.start(ctx, nil)
}
