//go:build e2e

package e2e_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/test/guest"
	"github.com/vtpmm/vtpmm/test/lab"
)

// TestE2ERestoreAfterTPMLoss (issue #14) on three lab hosts (registry
// embedded, vtpmm's qemu hook installed, 2-of-3 custodians alice, bob and
// carol):
//   - a Linux guest on host-a seals a secret in its vTPM;
//   - 'vtpmctl backup' writes its bundle (0 host TPM commands);
//   - host-a loses power (lab.Host.PowerOff: libvirtd, QEMU, vtpmd and its
//     host TPM SIGKILLed at once) and its TPM is destroyed (its swtpm
//     state wiped);
//   - the operator retires host-a ('vtpmctl host retire', retried until
//     its liveness lease has expired);
//   - the domain is defined (shut off) on host-b from host-a's definition,
//     and 'vtpmctl restore BUNDLE --to host-b' with alice's and carol's
//     identities puts the vTPM there; bob alone is refused first;
//   - 'virsh start' on host-b: the guest boots, finds its sealed secret in
//     its vTPM and unseals it every second: the same secret;
//   - host-a comes back with a new TPM ('vtpmd init'; its re-enrolment is
//     tried and logged) and refuses to start its old copy of the VM.
//
// It logs host-b's host TPM commands during the restore (one batch) and
// the time from the restore command to the VM running.
func TestE2ERestoreAfterTPMLoss(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	img := guestImage(ctx, t)
	requireLab(t)
	f := lab.NewFleet(ctx, t, lab.FleetConfig{Network: lab.NetworkConfig{Prefix: "ve2e"}, Tools: sharedTools(ctx, t),
		GoodLog: goodLog, Hosts: []lab.HostSpec{hostA(), hostB(), hostCGood()}, Log: logger(t), HookMode: true, Registry: "embedded"})
	f.AddHosts(ctx)
	cust, err := lab.NewCustodians(filepath.Join(f.Net.Dir, "custodians"), 2, "alice", "bob", "carol")
	if err != nil {
		t.Fatal(err)
	}
	backupDir := filepath.Join(f.Net.Dir, "backup")
	for _, name := range f.Order {
		h := f.Hosts[name]
		if err := h.Vtpmd.AppendConfig(cust.Config(backupDir)); err != nil {
			t.Fatal(err)
		}
		if err := h.Vtpmd.EnableMetrics(); err != nil {
			t.Fatal(err)
		}
	}
	f.Start(ctx)
	a, b := f.Hosts["host-a"], f.Hosts["host-b"]
	vm := f.CreateVM(ctx, a, "linux-r", lab.LinuxSpec(img))
	f.WaitTicks(ctx, vm, a.Name, 0, 2, 4*time.Minute)
	secret := f.VerifyConsole(vm, 2)
	t.Logf("guest sealed %s on host-a", secret)

	rep, err := f.Backup(ctx, a, backupDir, vm.Name)
	if err != nil {
		t.Fatal(err)
	}
	bundle := rep.Items[0].Path
	t.Logf("backup: %s (%d B, generation %d), %d host TPM commands, %v", bundle, rep.Items[0].Bytes, rep.Items[0].Generation, rep.TPMCommands, rep.Took)
	if rep.TPMCommands != 0 {
		t.Errorf("backup: %d host TPM commands, want 0", rep.TPMCommands)
	}

	// Disaster: host-a loses power and its TPM.
	if err := a.PowerOff(); err != nil {
		t.Fatal(err)
	}
	if err := a.WipeTPM(); err != nil {
		t.Fatal(err)
	}
	t.Log("host-a powered off, its TPM's state wiped")
	deadline := time.Now().Add(time.Minute)
	for {
		r, err := f.OperatorCtlOn(ctx, b, "host", "retire", "host-a")
		if err == nil && r.Code == 0 {
			t.Logf("vtpmctl host retire host-a:\n%s", r.Stdout)
			break
		}
		if err != nil || r.Code != 2 || time.Now().After(deadline) {
			t.Fatalf("vtpmctl host retire host-a: %v %s", err, r)
		}
		time.Sleep(time.Second) // its liveness lease (ttl 5 s) has not expired yet
	}

	// The domain on host-b, shut off, from host-a's definition (the
	// restore puts the vTPM state in its swtpm directory).
	xml, err := os.ReadFile(a.Path("/etc/libvirt/qemu/" + vm.Name + ".xml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(b.Path("/var/lib/libvirt/"+vm.Name+".xml"), xml, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, _, err := b.Virsh(ctx, "define", "/var/lib/libvirt/"+vm.Name+".xml"); err != nil {
		t.Fatalf("virsh define on host-b: %v %s", err, out)
	}
	restore := func(ids ...string) (lab.Result, error) {
		return f.OperatorCtlOn(ctx, b, append([]string{"restore", bundle, "--to", "host-b"}, cust.IdentityArgs(ids...)...)...)
	}
	if r, err := restore("bob"); err != nil || r.Code != 2 || !strings.Contains(r.Stderr, "alice") {
		t.Errorf("restore with bob alone: %v %s; want refused (exit 2) naming the missing custodians", err, r)
	} else {
		t.Logf("restore with 1 of 3 custodians refused: %s", strings.TrimSpace(r.Stderr))
	}
	before := scrape(ctx, t, b)
	t0 := time.Now()
	r, err := restore("alice", "carol")
	tookRestore := time.Since(t0)
	if err != nil || r.Code != 0 {
		t.Fatalf("vtpmctl restore with alice and carol: %v %s", err, r)
	}
	byName := map[string]int{}
	n := diffCommands(byName, "", before.TPMCommands(), scrape(ctx, t, b).TPMCommands())
	t.Logf("vtpmctl restore (%v):\n%s", tookRestore.Round(time.Millisecond), r.Stdout)
	if out, _, err := b.Virsh(ctx, "start", vm.Name); err != nil {
		t.Fatalf("virsh start on host-b after the restore: %v %s\n%s", err, out, b.Vtpmd.LogTail(3000))
	}
	for {
		d, err := b.Hyp.Domain(ctx, vm.UUID)
		if err == nil && d.State == hypervisor.StateRunning {
			break
		}
		if time.Since(t0) > 2*time.Minute {
			t.Fatalf("%s on host-b: %q, %v", vm.Name, d.State, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	running := time.Since(t0)
	t.Logf("restore onto host-b: %d host TPM commands on host-b in its batch %v; %v from 'vtpmctl restore' to the VM running (restore %v)",
		n, byName, running.Round(time.Millisecond), tookRestore.Round(time.Millisecond))

	// The guest boots on host-b, finds its secret and unseals it.
	f.WaitTicks(ctx, vm, b.Name, 0, 2, 4*time.Minute)
	raw, _ := os.ReadFile(b.Path(vm.Serial))
	c := guest.ParseConsole(raw)
	if len(c.Sealed) != 0 || len(c.Found) != 1 || c.Found[0] != secret || len(c.Errors) != 0 {
		t.Fatalf("guest on host-b: sealed %v, found %v, errors %v; want the secret %s found\n%s", c.Sealed, c.Found, c.Errors, secret, lab.Tail(string(raw), 2000))
	}
	for _, tk := range c.Ticks {
		if tk.Secret != secret || tk.PCR16 != guest.ExpectedPCR16() {
			t.Fatalf("guest on host-b: tick %+v, want secret %s", tk, secret)
		}
	}
	t.Logf("guest on host-b found its secret %s and unsealed it %d times", secret, len(c.Ticks))
	rows, out, err := f.VMList(ctx, b)
	if err != nil || !rows[vm.UUID].Owned || rows[vm.UUID].Gen != "2" {
		t.Errorf("host-b after the restore: %+v, %v\n%s", rows[vm.UUID], err, out)
	}

	// host-a returns with a new TPM: 'vtpmd init' on it, then its old copy
	// of the VM (libvirt's domain and vTPM state) must not start.
	if err := a.ReplaceTPM(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.Host.PowerOn(ctx); err != nil {
		t.Fatal(err)
	}
	if r, err := a.Vtpmd.Reinit(ctx); err != nil || r.Code != 0 {
		t.Fatalf("vtpmd init on host-a's new TPM: %v %s", err, r)
	}
	if err := a.Vtpmd.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if r, err := f.OperatorCtlOn(ctx, b, "host", "enroll", "host-a"); err != nil || r.Code != 0 {
		t.Logf("re-enrolment of host-a with its new TPM: %v exit %d: %s", err, r.Code, strings.TrimSpace(r.Stderr))
	} else {
		t.Logf("host-a re-enrolled: %s", r.Stdout)
	}
	out2, _, err := a.Virsh(ctx, "start", vm.Name)
	if err == nil {
		t.Fatalf("host-a started its old copy of %s after the restore", vm.Name)
	}
	if !strings.Contains(out2, "holds no key") && !strings.Contains(out2, "rule") {
		t.Errorf("host-a's refusal does not say why: %s", out2)
	}
	t.Logf("host-a refuses its old copy: %s", strings.TrimSpace(out2))
	if d, err := b.Hyp.Domain(ctx, vm.UUID); err != nil || d.State != hypervisor.StateRunning {
		t.Errorf("%s on host-b after host-a returned: %q, %v", vm.Name, d.State, err)
	}
}
