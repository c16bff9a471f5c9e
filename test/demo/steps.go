package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/vtpm/host"
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
)

// bind is part 1: a VM key bound to an emulated host TPM and its boot
// state, with the real vtpmd and vtpmm-guest (no hypervisor: vtpmd runs
// the vTPM itself).
func (d *demo) bind(ctx context.Context) error {
	d.part("Part 1: bind a VM's vTPM key to the host TPM")

	d.say("Provision emulated host A (the \"hardware\" TPM is swtpm)")
	hostA, err := d.host(ctx, "host-a", d.goodLog)
	if err != nil {
		return err
	}
	dataA := filepath.Join(d.work, "host-a", "data")
	cfgA, err := d.config("host-a", "host-a", dataA, hostA.URI())
	if err != nil {
		return err
	}

	d.say("vtpmd init on host A: SRK, and a vault key sealed to the TPM under PCRs 0,2,4,7")
	out, err := d.vtpmd(ctx, "", "--config", cfgA, "init", "--recovery-key")
	if err != nil {
		return fmt.Errorf("vtpmd init: %w", err)
	}
	recovery := ""
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if strings.HasPrefix(l, "  ") {
			recovery = strings.TrimSpace(l)
			d.detail("recovery key printed once to the operator: %s…", recovery[:8])
			continue
		}
		if !strings.HasPrefix(l, "RECOVERY") {
			d.detail("%s", l)
		}
	}

	d.say("vtpmd creates a vTPM for VM demo-vm: new VM key, swtpm state with EK certs, encrypted")
	t0 := time.Now()
	if out, err = d.vtpmd(ctx, "", "--config", cfgA, "vm", "create", "demo-vm", "--uuid", "0e2e0e2e-0000-4000-8000-00000000d3e0"); err != nil {
		return fmt.Errorf("vtpmd vm create: %w", err)
	}
	d.detail("%s (%s)", strings.TrimSpace(out), ms(time.Since(t0)))
	keyFile := filepath.Join(dataA, "keys", "0e2e0e2e-0000-4000-8000-00000000d3e0.key")
	if b, err := os.ReadFile(keyFile); err == nil {
		d.detail("on disk the VM key is only an AEAD envelope under the vault key: %s…", strings.TrimSpace(string(b))[:60])
	}

	d.say("vtpmd run: unseals the vault once and starts the VM's vTPM")
	ag, err := d.startAgent(ctx, cfgA)
	if err != nil {
		return err
	}
	secret := randomSecret()
	secretFile := filepath.Join(d.work, "guest-secret.txt")
	if err := os.WriteFile(secretFile, []byte(secret), 0o600); err != nil {
		return err
	}

	d.say("The guest seals a secret inside its vTPM (SRK + PCR policy, persisted in the vTPM)")
	if out, err = d.guest(ctx, ag.sock, "seal", "--secret-file", secretFile); err != nil {
		_ = d.stopAgent(ag)
		return err
	}
	_ = os.Remove(secretFile)
	d.detail("sealed %q %s", secret, strings.TrimSpace(out))

	d.say("Stop vtpmd and the vTPM; reboot host A (its TPM restarts, PCRs replay the same boot)")
	if err := d.stopAgent(ag); err != nil {
		return fmt.Errorf("stop vtpmd: %w", err)
	}
	if err := hostA.Restart(ctx); err != nil {
		return err
	}
	if err := d.boot(ctx, hostA, d.goodLog); err != nil {
		return err
	}
	d.detail("host A rebooted")

	d.say("vtpmd starts again; the guest unseals its secret")
	if ag, err = d.startAgent(ctx, cfgA); err != nil {
		return err
	}
	got, err := d.guest(ctx, ag.sock, "unseal")
	_ = d.stopAgent(ag)
	if err != nil {
		return err
	}
	if strings.TrimSpace(got) != secret {
		return fmt.Errorf("unsealed %q, want %q", strings.TrimSpace(got), secret)
	}
	d.detail("unsealed %q: it survived the restart", strings.TrimSpace(got))

	if err := d.copyToHostB(ctx, dataA); err != nil {
		return err
	}
	if err := d.tamperedBoot(ctx, cfgA, recovery); err != nil {
		return err
	}
	if err := d.scanForKeys(ctx, cfgA, dataA); err != nil {
		return err
	}
	d.stopHosts()
	return nil
}

// copyToHostB copies host A's data directory to host B and shows that
// neither the vault nor the vTPM opens there.
func (d *demo) copyToHostB(ctx context.Context, dataA string) error {
	d.say("Copy host A's whole data directory to host B (same boot state, different TPM)")
	hostB, err := d.host(ctx, "host-b", d.goodLog)
	if err != nil {
		return err
	}
	dataB := filepath.Join(d.work, "host-b", "stolen-data")
	if out, err := exec.Command("cp", "-a", dataA, dataB).CombinedOutput(); err != nil {
		return fmt.Errorf("copy: %v %s", err, out)
	}
	cfgB, err := d.config("host-b-with-copy", "host-a", dataB, hostB.URI())
	if err != nil {
		return err
	}
	_, err = d.vtpmd(ctx, "", "--config", cfgB, "vault", "status")
	if err == nil {
		return errors.New("the copied vault opened on host B")
	}
	d.detail("vault on host B refused: %v", err)
	if !strings.Contains(err.Error(), "different TPM") {
		return fmt.Errorf("unexpected refusal: %w", err)
	}
	// Without the vault there is no VM key; try the vTPM with a guessed key.
	guess := make([]byte, 32)
	_, _ = rand.Read(guess)
	pass := []byte(hex.EncodeToString(guess))
	p, err := swtpm.Start(ctx, swtpm.ProcessConfig{
		StateDir: filepath.Join(dataB, "vms", "0e2e0e2e-0000-4000-8000-00000000d3e0", "tpm2"), Passphrase: pass,
		LogFile: filepath.Join(d.work, "stolen-swtpm.log"),
	})
	if err != nil {
		d.detail("vTPM state on host B refused: %v", err)
		return nil
	}
	defer p.Stop(ctx)
	err = p.Init(ctx)
	if err == nil {
		return errors.New("the copied vTPM state opened under a guessed key")
	}
	d.detail("vTPM state on host B refused (wrong key=%v): %v", errors.Is(err, swtpm.ErrWrongPassphrase), err)
	return nil
}

// tamperedBoot reboots host A into a different boot chain: the vault
// refuses and names the PCRs; the recovery key (a planned change) reseals.
func (d *demo) tamperedBoot(ctx context.Context, cfgA, recovery string) error {
	d.say("Reboot host A into a different boot chain (tampered firmware/boot loader)")
	h := d.hosts[0]
	if err := h.Restart(ctx); err != nil {
		return err
	}
	if err := d.boot(ctx, h, d.badLog); err != nil {
		return err
	}
	_, err := d.vtpmd(ctx, "", "--config", cfgA, "vault", "status")
	if err == nil {
		return errors.New("the vault opened after a tampered boot")
	}
	msg := err.Error()
	if i := strings.Index(msg, ". To recover"); i > 0 {
		d.detail("vault refused: %s", msg[:i])
		d.detail("…%s", msg[i+2:])
	} else {
		d.detail("vault refused: %s", msg)
	}
	if !strings.Contains(msg, "PCR 0 changed") {
		return fmt.Errorf("refusal does not name the changed PCRs: %s", msg)
	}
	d.say("The operator confirms the change was planned: vtpmd vault recover with the recovery key")
	out, err := d.vtpmd(ctx, recovery+"\n", "--config", cfgA, "vault", "recover")
	if err != nil {
		return fmt.Errorf("vault recover: %w", err)
	}
	d.detail("%s", strings.TrimSpace(out))
	out, err = d.vtpmd(ctx, "", "--config", cfgA, "vault", "status")
	if err != nil {
		return fmt.Errorf("vault status after recovery: %w", err)
	}
	d.detail("%s", strings.ReplaceAll(strings.TrimSpace(out), "\n", "\n     "))
	return nil
}

// scanForKeys is the G1 check: it opens host A's vault (vtpmd is stopped),
// takes every VM key, and searches every file vtpmd wrote and all of its
// logs for the key as raw bytes, hex, HEX and base64.
func (d *demo) scanForKeys(ctx context.Context, cfgFile, dataA string) error {
	d.say("G1 check: no VM key, in any encoding, in any file vtpmd wrote or in its logs")
	cfg, err := daemon.LoadConfig(cfgFile)
	if err != nil {
		return err
	}
	a, err := host.Open(ctx, cfg.Config, host.Options{})
	if err != nil {
		return err
	}
	defer a.Close(ctx)
	forms, n, err := keyForms(ctx, a.Keys())
	if err != nil {
		return err
	}
	defer forms.wipe()
	files, err := forms.scan(filepath.Join(d.work, "vtpmd.log"), dataA)
	if err != nil {
		return err
	}
	d.detail("%d VM key(s) x %d encodings searched in %d files (key store, vault, vTPM state, logs): none found", n, len(keyEncodings), files)
	return nil
}
