package emuhost

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/vtpmm/vtpmm/vtpm/swtpm"
)

// provision writes the private swtpm_setup / swtpm-localca configuration and
// runs swtpm_setup unless the state already exists. The CA is created by
// swtpm_localca on first use inside Dir/ca, so every host has its own.
func (h *Host) provision(ctx context.Context) error {
	if _, err := os.Stat(filepath.Join(h.stateDir, "tpm2-00.permall")); err == nil {
		h.log.Debug("TPM state exists; not manufacturing again")
		return nil
	}
	dir := h.cfg.Dir
	localcaConf := filepath.Join(dir, "swtpm-localca.conf")
	localcaOpts := filepath.Join(dir, "swtpm-localca.options")
	setupConf := filepath.Join(dir, "swtpm_setup.conf")
	files := map[string]string{
		localcaConf: fmt.Sprintf("statedir = %[1]s\nsigningkey = %[1]s/signkey.pem\nissuercert = %[1]s/issuercert.pem\ncertserial = %[1]s/certserial\n", h.caDir),
		localcaOpts: fmt.Sprintf("--platform-manufacturer vtpmm\n--platform-version 2.1\n--platform-model emuhost-%s\n", h.cfg.Name),
		setupConf: fmt.Sprintf("create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = %s\n",
			localcaConf, localcaOpts, strings.Join(h.cfg.PCRBanks, ",")),
	}
	for p, c := range files {
		if err := os.WriteFile(p, []byte(c), 0o600); err != nil {
			return fmt.Errorf("emuhost provision: %w", err)
		}
	}
	tmp := filepath.Join(dir, "tmp")
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return fmt.Errorf("emuhost provision: %w", err)
	}
	args := []string{"--tpm2", "--tpmstate", h.stateDir, "--config", setupConf,
		"--createek", "--create-ek-cert", "--create-platform-cert",
		"--pcr-banks", strings.Join(h.cfg.PCRBanks, ","),
		"--vmid", h.cfg.Name, "--logfile", filepath.Join(dir, "swtpm_setup.log"), "--overwrite"}
	cmd := exec.CommandContext(ctx, "swtpm_setup", args...)
	// swtpm_setup stages certificates in $TMPDIR; keep them inside Dir.
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	h.provisionTime = time.Since(t0)
	if err != nil {
		return fmt.Errorf("emuhost provision %s: %w: %v: %s (log: %s)", h.cfg.Name, ErrSetup, err,
			strings.TrimSpace(string(out)), swtpm.LogTail(filepath.Join(dir, "swtpm_setup.log")))
	}
	h.log.WithField("took", h.provisionTime).Info("host TPM manufactured")
	return nil
}
