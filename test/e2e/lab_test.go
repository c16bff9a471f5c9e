//go:build e2e

package e2e_test

import (
	"context"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/test/lab"
)

// TestLabPrimitives proves the lab's primitives for failover tests (issue
// #15) on three hosts with the registry embedded and a VM running on
// host-a:
//   - partition: after Network.Cut(host-a), host-a reaches neither
//     host-b's nor host-c's etcd ports while host-b still reaches host-c;
//     after Heal it reaches them again;
//   - power loss: after Host.PowerOff nothing of host-a runs (no process
//     in its network namespace: libvirtd, the VM's QEMU and swtpm, vtpmd;
//     no host TPM); after PowerOn its vtpmd serves again, still owning the
//     VM at generation 1 (the host TPM kept its NV state), the VM shut off;
//   - fence agent: 'fence_lab --action status' says on (exit 0), 'off'
//     with its options on stdin as fenced passes them, run inside host-b's
//     namespaces as its vtpmd would, fences it (exit 0, nothing runs),
//     'status' then says off (exit 2).
func TestLabPrimitives(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	f := newRegistryFleet(ctx, t, "embedded", hostA(), hostB(), hostCGood())
	f.Start(ctx)
	a, b, c := f.Hosts["host-a"], f.Hosts["host-b"], f.Hosts["host-c"]
	vm := f.CreateVM(ctx, a, "prim-1", libvirt.VMSpec{MemoryMiB: 128, TPMVersion: "2.0", TCG: !lab.KVM()})
	etcd := func(h *lab.FleetHost) string { return net.JoinHostPort(h.IP, strconv.Itoa(lab.RegistryClientPort)) }
	peer := func(h *lab.FleetHost) string { return net.JoinHostPort(h.IP, strconv.Itoa(lab.RegistryPeerPort)) }

	t.Run("partition", func(t *testing.T) {
		if !a.Reachable(ctx, etcd(b), 2*time.Second) {
			t.Fatal("host-a cannot reach host-b's etcd before the cut")
		}
		if err := f.Net.Cut(ctx, a.Host); err != nil {
			t.Fatal(err)
		}
		for _, addr := range []string{etcd(b), peer(b), etcd(c), peer(c)} {
			if a.Reachable(ctx, addr, 2*time.Second) {
				t.Errorf("host-a reaches %s while cut", addr)
			}
		}
		if !b.Reachable(ctx, etcd(c), 2*time.Second) {
			t.Error("host-b cannot reach host-c while only host-a is cut")
		}
		if r, err := b.Vtpmd.Ctl(ctx, "host", "list"); err != nil || r.Code != 0 {
			t.Errorf("host-b's registry (quorum with host-c) while host-a is cut: %v %s", err, r)
		}
		if err := f.Net.Heal(ctx, a.Host); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(20 * time.Second)
		for !a.Reachable(ctx, etcd(b), 2*time.Second) || !a.Reachable(ctx, peer(c), 2*time.Second) {
			if time.Now().After(deadline) {
				t.Fatal("host-a does not reach host-b and host-c 20 s after the heal")
			}
			time.Sleep(500 * time.Millisecond)
		}
	})

	t.Run("power off and on", func(t *testing.T) {
		qemu := qemuPID(t, a, vm.Name)
		if err := a.PowerOff(); err != nil {
			t.Fatal(err)
		}
		if off, why := a.Off(); !off {
			t.Fatalf("host-a after PowerOff: %s", why)
		}
		if alive(qemu) {
			t.Errorf("the VM's QEMU %d survived the power loss", qemu)
		}
		if a.Vtpmd.Running() {
			t.Error("host-a's vtpmd runs after the power loss")
		}
		powerOnAndCheck(ctx, t, f, a, vm)
	})

	t.Run("fence agent", func(t *testing.T) {
		agent, err := lab.BuildFenceAgent(ctx, t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		cmdline := f.Net.FenceCommand(agent, a.Host)
		status := append(cmdline[:len(cmdline)-1:len(cmdline)-1], "status")
		if code, out := runAgent(ctx, t, status, ""); code != 0 {
			t.Fatalf("fence_lab status of a running host: exit %d, want 0 (on): %s", code, out)
		}
		// As fenced/stonith-ng run it, options on stdin, and from another
		// host's namespaces, as host-b's vtpmd would run its fence command.
		cmd, err := b.NsCommand(ctx, agent)
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stdin = strings.NewReader("action=off\nplug=host-a\nlab_dir=" + f.Net.Dir + "\n")
		o, err := cmd.CombinedOutput()
		code, out := 0, string(o)
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != 0 {
			t.Fatalf("fence_lab off: exit %d, want 0: %s", code, out)
		}
		t.Logf("fence_lab off: %s", strings.TrimSpace(out))
		if off, why := a.Off(); !off {
			t.Fatalf("host-a after fence_lab off: %s", why)
		}
		if code, out := runAgent(ctx, t, status, ""); code != 2 {
			t.Errorf("fence_lab status of a fenced host: exit %d, want 2 (off): %s", code, out)
		}
		if code, _ := runAgent(ctx, t, cmdline, ""); code != 0 {
			t.Errorf("fence_lab off of a host already off: exit %d, want 0", code)
		}
		if err := a.PowerOff(); err != nil { // nothing left to kill: waits until the test process reaped them
			t.Fatal(err)
		}
		powerOnAndCheck(ctx, t, f, a, vm)
	})
}

// alive reports whether process pid exists and is not a zombie (a killed
// host's processes are re-parented to PID 1, which may reap them late).
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	_, rest, ok := strings.Cut(string(b), ") ")
	return ok && !strings.HasPrefix(rest, "Z")
}

// qemuPID is the pid of the VM's QEMU on h (libvirt's pid file).
func qemuPID(t *testing.T, h *lab.FleetHost, name string) int {
	t.Helper()
	b, err := os.ReadFile(h.Path("/run/libvirt/qemu/" + name + ".pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// powerOnAndCheck powers h on and checks that its vtpmd serves, still owns
// vm at generation 1, and that libvirt knows the VM, shut off.
func powerOnAndCheck(ctx context.Context, t *testing.T, f *lab.Fleet, h *lab.FleetHost, vm *lab.VM) {
	t.Helper()
	t0 := time.Now()
	if err := h.PowerOn(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s powered on, vtpmd serving, in %v", h.Name, time.Since(t0).Round(time.Millisecond))
	rows, out, err := f.VMList(ctx, h)
	if err != nil {
		t.Fatal(err)
	}
	if r := rows[vm.UUID]; !r.Owned || r.Gen != "1" {
		t.Errorf("%s after the power loss: %+v, want owned at generation 1\n%s", h.Name, r, out)
	}
	d, err := h.Hyp.Domain(ctx, vm.UUID)
	if err != nil || d.State == hypervisor.StateRunning || d.State == hypervisor.StateAbsent {
		t.Errorf("%s on %s after the power loss: %q, %v; want defined, not running", vm.Name, h.Name, d.State, err)
	}
}

// runAgent runs the fence agent with args (stdin given) and returns its
// exit code and output.
func runAgent(ctx context.Context, t *testing.T, args []string, stdin string) (int, string) {
	t.Helper()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), string(out)
	}
	if err != nil {
		t.Fatalf("%s: %v", args[0], err)
	}
	return 0, string(out)
}
