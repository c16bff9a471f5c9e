package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/devfleet"
	"github.com/vtpmm/vtpmm/vtpm"
)

// migration runs three vtpmd agents on loopback (gRPC over mTLS), each on
// its own emulated host TPM and hypervisor host, and drives them with the
// real vtpmctl and vtpmm-guest binaries.
func (d *demo) migration(ctx context.Context) error {
	fmt.Fprintf(d.out, "\n== Part 2: attested live migration between agents ==\n")
	root := filepath.Join(d.work, "fleet")
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	d.say("Development CA for the agents' mutual TLS: vtpmctl pki init / issue")
	pkiDir := filepath.Join(root, "pki")
	if _, err := d.vtpmctl(ctx, "pki", "init", "--dir", pkiDir); err != nil {
		return err
	}
	for _, h := range []string{"host-a", "host-b", "host-c"} {
		if _, err := d.vtpmctl(ctx, "pki", "issue", h, "--dir", pkiDir, "--out", pkiDir); err != nil {
			return err
		}
	}
	d.detail("CA and certificates for host-a, host-b, host-c in %s", pkiDir)

	d.say("Operator policy from the known-good boot log: vtpmctl eventlog golden")
	policy, err := d.vtpmctl(ctx, "eventlog", "golden", d.goodLog, "--pcrs", "0,1,2,3,4,5,6,7,8,9")
	if err != nil {
		return err
	}
	policyFile := filepath.Join(root, "policy.yaml")
	if err := os.WriteFile(policyFile, []byte(policy), 0o600); err != nil {
		return err
	}
	d.detail("policy pins PCRs 0-9 (sha256) and the event log's rules: %s", policyFile)

	d.say("Provision three hosts: A and B boot the good chain, C boots a tampered one")
	fl := devfleet.New(devfleet.Config{Root: root, PKIDir: pkiDir, PolicyFile: policyFile, Log: d.daemonLog})
	defer fl.Close(context.WithoutCancel(ctx))
	for _, spec := range []struct{ name, log string }{{"host-a", d.goodLog}, {"host-b", d.goodLog}, {"host-c", d.badLog}} {
		h, err := fl.AddHost(ctx, spec.name, spec.log)
		if err != nil {
			return fmt.Errorf("provision %s: %w", spec.name, err)
		}
		d.detail("%s: TPM booted from %s, vault sealed, AK and MK provisioned, wire on %s",
			spec.name, filepath.Base(spec.log), h.Wire.Addr())
	}
	if err := fl.Start(ctx); err != nil {
		return err
	}
	hosts := fl.Hosts
	d.say("Enrolment: each host verifies its peers' EK certificates and activates their AKs (vtpmctl host enroll)")
	for _, pair := range [][2]string{{"host-a", "host-b"}, {"host-a", "host-c"}, {"host-b", "host-a"}, {"host-b", "host-c"}} {
		out, err := d.vtpmctl(ctx, "host", "enroll", pair[1], "--socket", hosts[pair[0]].Cfg.AdminSocketPath())
		if err != nil {
			return err
		}
		d.detail("on %s: %s", pair[0], strings.SplitN(out, "\n", 2)[0])
	}
	a, b, c := hosts["host-a"], hosts["host-b"], hosts["host-c"]
	out, err := d.vtpmctl(ctx, "host", "list", "--socket", a.Cfg.AdminSocketPath())
	if err != nil {
		return err
	}
	d.detail("vtpmctl host list (on host-a):\n     %s", indent(out))

	d.say("host-a creates VM web-1 with a vTPM; the hypervisor starts it; the guest seals a secret")
	vm, err := a.CreateRunningVM(ctx, "web-1")
	if err != nil {
		return err
	}
	secret := randomSecret()
	secretFile := filepath.Join(d.work, "guest2-secret.txt")
	if err := os.WriteFile(secretFile, []byte(secret), 0o600); err != nil {
		return err
	}
	uri, err := a.Hyp.VTPMURI(vm)
	if err != nil {
		return err
	}
	if _, err := d.guest(ctx, uri, "seal", "--secret-file", secretFile); err != nil {
		return err
	}
	_ = os.Remove(secretFile)
	d.detail("sealed %q inside web-1's vTPM on host-a", secret)

	d.say("vtpmctl migrate web-1 --to host-b")
	out, err = d.vtpmctl(ctx, "migrate", "web-1", "--to", "host-b", "--socket", a.Cfg.AdminSocketPath())
	if err != nil {
		return fmt.Errorf("migrate to host-b: %w", err)
	}
	d.detail("%s", indent(out))
	uri, err = b.Hyp.VTPMURI(vm)
	if err != nil {
		return err
	}
	got, err := d.guest(ctx, uri, "unseal")
	if err != nil {
		return err
	}
	if strings.TrimSpace(got) != secret {
		return fmt.Errorf("unsealed %q on host-b, want %q", got, secret)
	}
	d.detail("the guest unseals %q on host-b", strings.TrimSpace(got))
	if _, _, err := a.Daemon.Keys().Get(ctx, vm); !errors.Is(err, vtpm.ErrKeyNotFound) {
		return fmt.Errorf("host-a still holds the key of web-1 (%v)", err)
	}
	if dom, _ := a.Hyp.Domain(ctx, vm); dom.State != hypervisor.StateAbsent {
		return fmt.Errorf("web-1 is still %s on host-a", dom.State)
	}
	out, _ = d.vtpmctl(ctx, "vm", "list", "--socket", a.Cfg.AdminSocketPath())
	d.detail("host-a no longer holds a usable copy (key shredded, domain gone); vtpmctl vm list on host-a:\n     %s", indent(out))

	d.say("vtpmctl migrate web-1 --to host-c (host-c booted a tampered chain)")
	out, err = d.vtpmctl(ctx, "migrate", "web-1", "--to", "host-c", "--socket", b.Cfg.AdminSocketPath())
	var ee *exec.ExitError
	if err == nil || !errors.As(errors.Unwrap(err), &ee) || ee.ExitCode() != 2 {
		return fmt.Errorf("migration to host-c was not refused with exit code 2: %v\n%s", err, out)
	}
	d.detail("refused (exit 2): %s", lastLine(err.Error()))
	if ok, _ := c.Hyp.HasSecret(ctx, vm); ok {
		return errors.New("a vTPM secret was defined on host-c")
	}
	if files, _ := filepath.Glob(filepath.Join(c.Cfg.DataDir, "keys", vm+"*")); len(files) != 0 {
		return fmt.Errorf("host-c holds key files: %v", files)
	}
	d.detail("host-c received no key bytes: no secret defined, no key file; web-1 keeps running on host-b")

	d.say("The audit trail on host-b: vtpmctl audit")
	out, err = d.vtpmctl(ctx, "audit", "--socket", b.Cfg.AdminSocketPath())
	if err != nil {
		return err
	}
	d.detail("%s", indent(out))
	return nil
}

func indent(s string) string {
	return strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n     ")
}

// vtpmctl runs the real vtpmctl binary.
func (d *demo) vtpmctl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(d.bin, "vtpmctl"), args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("vtpmctl %s: %w: %s", args[0], err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// daemonLog sends a host daemon's JSON logs to a file in the work dir.
func (d *demo) daemonLog(host string) logrus.FieldLogger {
	log := logrus.New()
	log.SetFormatter(&logrus.JSONFormatter{})
	log.SetLevel(logrus.DebugLevel)
	f, err := os.OpenFile(filepath.Join(d.work, host+"-vtpmd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err == nil {
		log.SetOutput(f)
	} else {
		log.SetOutput(io.Discard)
	}
	return log
}
