//go:build e2e

package e2e_test

import (
	"context"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/test/lab"
)

var hostC = lab.HostSpec{Name: "host-c", IP: "10.251.0.3", BootLog: badLog}

// virsh runs virsh against the host's own libvirtd, inside its namespaces.
func virsh(ctx context.Context, t *testing.T, h *lab.FleetHost, args ...string) (string, time.Duration, error) {
	t.Helper()
	rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd, err := h.NsCommand(rctx, "virsh", append([]string{"-c", "qemu:///system"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	cmd.WaitDelay = 5 * time.Second
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	return string(out), time.Since(t0), err
}

func plainMigrate(ctx context.Context, t *testing.T, vm *lab.VM, src, dst *lab.FleetHost) (string, time.Duration, error) {
	t.Helper()
	return virsh(ctx, t, src, "migrate", "--live", "--p2p", "--persistent", "--undefinesource", vm.Name, "qemu+tcp://"+dst.IP+"/system")
}

// lastPullTook returns the duration vtpmd logged for its last hook pull.
func lastPullTook(t *testing.T, h *lab.FleetHost) string {
	t.Helper()
	b, err := os.ReadFile(h.Vtpmd.LogPath)
	if err != nil {
		return err.Error()
	}
	took := "?"
	for _, line := range strings.Split(string(b), "\n") {
		var e struct {
			Msg  string `json:"msg"`
			Took int64  `json:"took"`
		}
		if json.Unmarshal([]byte(line), &e) == nil && e.Msg == "hook: key pulled for an incoming migration" {
			took = time.Duration(e.Took).Round(time.Millisecond).String()
		}
	}
	return took
}

// waitOwner polls until exactly one host owns and runs the VM (the source
// settles a hook-mode migration in the background after "release end").
func waitOwner(ctx context.Context, t *testing.T, f *lab.Fleet, vm *lab.VM, want string, limit time.Duration) time.Duration {
	t.Helper()
	t0 := time.Now()
	for {
		owner, report, err := f.Owner(ctx, vm)
		if err == nil && owner == want {
			return time.Since(t0)
		}
		if time.Since(t0) > limit {
			t.Fatalf("VM %s: owner %q, want %s after %v: %v\n%s", vm.Name, owner, want, limit, err, report)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestHookModeVirshMigrate: with vtpmm's qemu hook installed ('vtpmctl
// hook install') a plain 'virsh migrate --live --p2p' of a vTPM VM moves
// its key: the destination pulls it at "migrate begin", the source commits
// after "release end". It goes A->B and back B->A. To the untrusted host-c
// virsh fails at once, in the hook, with the attestation rule in its
// error; the VM keeps running on B and host-c gets no secret and no key.
// A cold start after libvirtd lost its ephemeral secrets works through
// "prepare begin", and a start on a host without the key is refused.
func TestHookModeVirshMigrate(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	requireLab(t)
	f := lab.NewFleet(ctx, t, lab.FleetConfig{Network: lab.NetworkConfig{Prefix: "ve2e"}, Tools: sharedTools(ctx, t),
		GoodLog: goodLog, Hosts: []lab.HostSpec{hostA, hostB, hostC}, Log: logger(t), HookMode: true})
	f.AddHosts(ctx)
	a, b, c := f.Hosts["host-a"], f.Hosts["host-b"], f.Hosts["host-c"]
	vm := f.CreateVM(ctx, a, "hook-1", libvirt.VMSpec{TCG: !lab.KVM()})
	f.Start(ctx)

	for _, hop := range []struct{ src, dst *lab.FleetHost }{{a, b}, {b, a}, {a, b}} {
		out, wall, err := plainMigrate(ctx, t, vm, hop.src, hop.dst)
		if err != nil {
			t.Fatalf("virsh migrate %s->%s through the hook: %v\n%s\nsource vtpmd:\n%s\ndestination vtpmd:\n%s", hop.src.Name, hop.dst.Name,
				err, out, hop.src.Vtpmd.LogTail(3000), hop.dst.Vtpmd.LogTail(3000))
		}
		settled := waitOwner(ctx, t, f, vm, hop.dst.Name, 45*time.Second)
		job, jerr := hop.dst.Hyp.CompletedJobStats(ctx, vm.UUID)
		t.Logf("virsh migrate %s->%s with the hook: %v (libvirt job %v, downtime %v, %v; the pull in the hook took %s); settled %v later",
			hop.src.Name, hop.dst.Name, wall.Round(time.Millisecond), job.Elapsed, job.Downtime, jerr, lastPullTook(t, hop.dst), settled.Round(time.Millisecond))
	}

	// Untrusted destination: virsh fails early, naming the rule.
	out, wall, err := plainMigrate(ctx, t, vm, b, c)
	if err == nil {
		t.Fatalf("virsh migrate to the untrusted host-c succeeded:\n%s", out)
	}
	for _, want := range []string{"Hook script execution failed", "vtpmm refused the incoming migration", "rule pcr-policy"} {
		if !strings.Contains(out, want) {
			t.Errorf("virsh's error lacks %q:\n%s", want, out)
		}
	}
	t.Logf("virsh migrate to untrusted host-c refused after %v:\n%s", wall.Round(time.Millisecond), strings.TrimSpace(out))
	if d, err := b.Hyp.Domain(ctx, vm.UUID); err != nil || d.State != hypervisor.StateRunning {
		t.Fatalf("after the refusal the VM on host-b is %q (%v)", d.State, err)
	}
	if d, _ := c.Hyp.Domain(ctx, vm.UUID); d.State != hypervisor.StateAbsent {
		t.Fatalf("host-c has the domain: %s", d.State)
	}
	if rows, _, err := f.VMList(ctx, c); err != nil || rows[vm.UUID].Owned || (rows[vm.UUID].Pending != "" && rows[vm.UUID].Pending != "-") {
		t.Fatalf("host-c's key store after the refusal: %+v %v", rows[vm.UUID], err)
	}
	waitOwner(ctx, t, f, vm, "host-b", 45*time.Second) // includes: no secret on host-c

	// Cold start on the owner after its libvirt forgot the secret.
	if out, _, err := virsh(ctx, t, b, "destroy", vm.Name); err != nil {
		t.Fatalf("virsh destroy: %v\n%s", err, out)
	}
	if err := b.Hyp.UndefineSecret(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if out, wall, err := virsh(ctx, t, b, "start", vm.Name); err != nil {
		t.Fatalf("virsh start on the owner through 'prepare begin': %v\n%s\n%s", err, out, b.Vtpmd.LogTail(3000))
	} else {
		t.Logf("virsh start after the secret was gone: %v", wall.Round(time.Millisecond))
	}
	waitOwner(ctx, t, f, vm, "host-b", 30*time.Second)

	// A start on a host without the key is refused by the hook. Define the
	// same domain on host-a (libvirt keeps no copy after a migration).
	xml, _, err := virsh(ctx, t, b, "dumpxml", "--inactive", vm.Name)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(a.Path("/var/lib/libvirt/hook-1.xml"), []byte(xml), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, _, err := virsh(ctx, t, a, "define", "/var/lib/libvirt/hook-1.xml"); err != nil {
		t.Fatalf("virsh define on host-a: %v\n%s", err, out)
	}
	out, _, err = virsh(ctx, t, a, "start", vm.Name)
	if err == nil || !strings.Contains(out, "holds no key") {
		t.Fatalf("start on host-a, which has no key: %v\n%s", err, out)
	}
	t.Logf("start on host-a refused: %s", strings.TrimSpace(out))
	if out, _, err := virsh(ctx, t, a, "undefine", vm.Name); err != nil {
		t.Fatalf("virsh undefine on host-a: %v\n%s", err, out)
	}
	waitOwner(ctx, t, f, vm, "host-b", 30*time.Second)
}
