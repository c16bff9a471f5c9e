//go:build e2e

package e2e_test

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/scenarios"
	"github.com/vtpmm/vtpmm/test/lab"
)

// TestScenariosHookMode runs the migration scenarios (test/fleet) on three
// lab hosts with vtpmm's libvirt qemu hook installed ('vtpmctl hook
// install'), hook mode included: a plain 'virsh migrate --live --p2p'
// moves the vTPM key there and back, and to the untrusted host-c virsh
// fails in the hook with the attestation rule in its error. Then, on real
// libvirt only: a cold start after libvirtd lost its ephemeral secrets
// works through "prepare begin", and a start on a host without the key is
// refused. The VMs are firmware-only (TestScenarios boots the Linux guest).
func TestScenariosHookMode(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	requireLab(t)
	f := lab.NewFleet(ctx, t, lab.FleetConfig{Network: lab.NetworkConfig{Prefix: "ve2e"}, Tools: sharedTools(ctx, t),
		GoodLog: goodLog, Hosts: []lab.HostSpec{hostA(), hostB(), hostC()}, Log: logger(t), HookMode: true})
	f.AddHosts(ctx)
	f.Start(ctx)
	c := f.Contract(nil)
	// The crash scenarios run in TestScenarios (and in process in hook
	// mode too); here the others, hook mode included.
	t.Run("cold", func(t *testing.T) { scenarios.Cold(t, c) })
	t.Run("warm", func(t *testing.T) { scenarios.Warm(t, c) })
	t.Run("refused", func(t *testing.T) { scenarios.Refused(t, c) })
	t.Run("hook mode", func(t *testing.T) { scenarios.HookMode(t, c) })
	t.Run("cold start through prepare begin", func(t *testing.T) { hookColdStart(ctx, t, f, c) })
}

// hookColdStart: the owner's libvirtd forgot the VM's secret (as after a
// restart); 'virsh start' works because "prepare begin" has vtpmd define
// it from its vault. A start on a host that has no key is refused.
func hookColdStart(ctx context.Context, t *testing.T, f *lab.Fleet, c fleet.Fleet) {
	vm, err := c.CreateVM(ctx, fleet.HostA, "hook-cold")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.RemoveVM(context.WithoutCancel(ctx), vm) }()
	a, b := f.Hosts[fleet.HostA], f.Hosts[fleet.HostB]
	if err := c.Host(fleet.HostA).PlainMigrate(ctx, vm, fleet.HostB); err != nil {
		t.Fatal(err)
	}
	if err := fleet.WaitOwner(ctx, c, vm, fleet.HostB, 45*time.Second); err != nil {
		t.Fatal(err)
	}
	if out, _, err := b.Virsh(ctx, "destroy", vm.Name); err != nil {
		t.Fatalf("virsh destroy: %v\n%s", err, out)
	}
	if err := b.Hyp.UndefineSecret(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if out, wall, err := b.Virsh(ctx, "start", vm.Name); err != nil {
		t.Fatalf("virsh start on the owner through 'prepare begin': %v\n%s\n%s", err, out, b.Vtpmd.LogTail(3000))
	} else {
		t.Logf("virsh start after the secret was gone: %v", wall.Round(time.Millisecond))
	}
	if err := fleet.WaitOwner(ctx, c, vm, fleet.HostB, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	// Define the same domain on host-a (libvirt keeps no copy after a
	// migration) and start it there: refused, host-a holds no key.
	xml, _, err := b.Virsh(ctx, "dumpxml", "--inactive", vm.Name)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(a.Path("/var/lib/libvirt/hook-cold.xml"), []byte(xml), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, _, err := a.Virsh(ctx, "define", "/var/lib/libvirt/hook-cold.xml"); err != nil {
		t.Fatalf("virsh define on host-a: %v\n%s", err, out)
	}
	out, _, err := a.Virsh(ctx, "start", vm.Name)
	if err == nil || !strings.Contains(out, "holds no key") {
		t.Fatalf("start on host-a, which has no key: %v\n%s", err, out)
	}
	t.Logf("start on host-a refused: %s", strings.TrimSpace(out))
	if out, _, err := a.Virsh(ctx, "undefine", vm.Name); err != nil {
		t.Fatalf("virsh undefine on host-a: %v\n%s", err, out)
	}
	if err := fleet.WaitOwner(ctx, c, vm, fleet.HostB, 30*time.Second); err != nil {
		t.Fatal(err)
	}
}
