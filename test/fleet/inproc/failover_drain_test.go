package inproc_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/errclass"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// TestFailoverNotOntoDrainingHost is soak seed 4's finding (wave 5): a
// standby that the operator drains (an evacuation runs on it) promoted
// replicas, and the VMs ran on the host being emptied. Now a draining host
// is never a promoter: its automatic failover skips its replicas, and the
// operator's 'failover --to' it is refused naming rule draining. Once the
// operator undrains it, the automatic failover promotes there.
func TestFailoverNotOntoDrainingHost(t *testing.T) {
	ctx := context.Background()
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "auto")
	a, b := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB)
	vm, err := f.CreateVM(ctx, fleet.HostA, "drain-fo-1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm.UUID, On: []string{fleet.HostB}}); err != nil {
		t.Fatal(err)
	}
	waitReplicas(t, f, vm, 1, fleet.HostB)
	if err := f.Operator().SetState(ctx, fleet.HostB, registry.StateDraining); err != nil {
		t.Fatal(err)
	}
	if err := a.Crash(ctx); err != nil {
		t.Fatal(err)
	}
	waitNotLive(t, f, fleet.HostA)
	// A few passes of host-b's standby loop (every second): it must not
	// promote. (Before the fix it did, within one pass.)
	time.Sleep(3 * time.Second)
	if owner, gen := ownerOf(ctx, f, vm); owner != fleet.HostA || gen != 1 {
		t.Fatalf("the draining standby took the VM: the registry shows %s at generation %d", owner, gen)
	}
	if f.Fenced(fleet.HostA) != 0 {
		t.Fatalf("the draining standby ran the fence agent for host-a %d times", f.Fenced(fleet.HostA))
	}
	_, err = b.Admin().Failover(ctx, adminapi.FailoverRequest{VM: vm.UUID, To: fleet.HostB, ConfirmFenced: []string{fleet.HostA}})
	if err == nil || !strings.Contains(err.Error(), "rule "+migrate.RuleDraining) {
		t.Fatalf("the operator's failover onto the draining host-b: %v, want a refusal naming rule %s", err, migrate.RuleDraining)
	}
	t.Logf("refused: %v", err)
	if b.Running(ctx, vm) {
		t.Fatal("the VM runs on the draining host")
	}
	// The operator undrains host-b: the automatic failover promotes there.
	if err := f.Operator().SetState(ctx, fleet.HostB, registry.StateActive); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "host-b promoted once undrained", 2*time.Minute, func() bool {
		owner, gen := ownerOf(ctx, f, vm)
		return owner == fleet.HostB && gen == 2
	})
	waitFor(t, "the VM runs on host-b", time.Minute, func() bool { return b.Running(ctx, vm) })
}

// TestFencedByDrainingHost: host-b fenced host-a to take one of its VMs
// over (the operator's failover of vm-1), then the operator drains host-b.
// The fence record is per host, so host-a, back, is fenced for vm-2 too;
// host-b, draining, never promotes vm-2. host-a takes vm-2 back (Reassert)
// instead of waiting for a promotion that cannot come, and may start it;
// host-b does not take it.
func TestFencedByDrainingHost(t *testing.T) {
	ctx := context.Background()
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "manual")
	a, b := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB)
	vm1, err := f.CreateVM(ctx, fleet.HostA, "drain-fence-1")
	if err != nil {
		t.Fatal(err)
	}
	vm2, err := f.CreateVM(ctx, fleet.HostA, "drain-fence-2")
	if err != nil {
		t.Fatal(err)
	}
	for _, vm := range []fleet.VM{vm1, vm2} {
		if _, err := a.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm.UUID, On: []string{fleet.HostB}}); err != nil {
			t.Fatal(err)
		}
		waitReplicas(t, f, vm, 1, fleet.HostB)
	}
	if err := a.Crash(ctx); err != nil {
		t.Fatal(err)
	}
	if err := f.Fence(ctx, fleet.HostA); err != nil { // the operator powers host-a off
		t.Fatal(err)
	}
	operatorFailover(t, f, b, vm1, fleet.HostA)
	if err := f.Operator().SetState(ctx, fleet.HostB, registry.StateDraining); err != nil {
		t.Fatal(err)
	}
	if err := a.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Daemon().Node().CheckStart(ctx, vm2.UUID); err != nil {
		t.Fatalf("host-a's start of vm-2, fenced by the draining host-b: %v, want it taken back", err)
	}
	if owner, gen := ownerOf(ctx, f, vm2); owner != fleet.HostA || gen != 1 {
		t.Fatalf("vm-2's record: %s at generation %d, want host-a at 1", owner, gen)
	}
	if _, err := b.Admin().Failover(ctx, adminapi.FailoverRequest{VM: vm2.UUID, To: fleet.HostB, ConfirmFenced: []string{fleet.HostA}}); err == nil {
		t.Fatal("the draining host-b promoted vm-2")
	}
}

// operatorFailover is the operator's 'vtpmctl failover VM --to H
// --confirm-fenced OLD', retried as an operator retries exit 6 (registry
// unavailable). Host-a's crash hard-stops its etcd member; if it led, the
// election can outlast host-b's 2-second lease under load, and host-b
// self-fences meanwhile (CI run of 17eaf6d): either the promotion waits, or
// it wins and the start is left to the failover loop
// (TestFailoverStartRetried). What the callers need is the promotion.
func operatorFailover(t *testing.T, f *inproc.Fleet, h *inproc.Host, vm fleet.VM, fenced string) {
	t.Helper()
	ctx := context.Background()
	var err error
	for end := time.Now().Add(time.Minute); time.Now().Before(end); time.Sleep(200 * time.Millisecond) {
		if _, err = h.Admin().Failover(ctx, adminapi.FailoverRequest{VM: vm.UUID, To: h.Name(), ConfirmFenced: []string{fenced}}); err == nil {
			return
		}
		if owner, gen := ownerOf(ctx, f, vm); owner == h.Name() && gen == 2 {
			t.Logf("promoted; the start is left to the failover loop: %v", err)
			return
		}
		if errclass.CodeOf(err) != errclass.CodeUnavailable {
			break
		}
	}
	t.Fatalf("the operator's failover of %s onto %s: %v", vm.Name, h.Name(), err)
}
