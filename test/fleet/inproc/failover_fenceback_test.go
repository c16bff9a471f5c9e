package inproc_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/test/fleet"
)

// TestFailoverHostBackBeforeFenceRecord (make soak seed 4018): the owner
// comes back between the fence agent and the fence record (a quick reboot)
// and starts its VM again, which its start rule allows, since no fence
// record exists yet. The promoting standby then writes the record and must
// fence the host once more before its compare-and-swap: else the VM runs
// on two hosts. At the end it runs on the standby alone, with the
// tenant's secret.
func TestFailoverHostBackBeforeFenceRecord(t *testing.T) {
	ctx := context.Background()
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "auto")
	a, b := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB)
	vm, err := f.CreateVM(ctx, fleet.HostA, "fenceback-1")
	if err != nil {
		t.Fatal(err)
	}
	secret, err := a.TenantReseal(ctx, vm) // before the first replica: it carries the secret
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm.UUID, On: []string{fleet.HostB}}); err != nil {
		t.Fatal(err)
	}
	waitReplicas(t, f, vm, 1, fleet.HostB)
	var back atomic.Bool
	f.AfterFence = func(ctx context.Context, host string) {
		if host != fleet.HostA || back.Swap(true) {
			return
		}
		if err := a.Restart(ctx); err != nil {
			t.Errorf("restart host-a after the fence: %v", err)
			return
		}
		var err error
		for end := time.Now().Add(20 * time.Second); time.Now().Before(end); time.Sleep(200 * time.Millisecond) {
			if _, err = a.Daemon().Node().DefineSecret(ctx, vm.UUID); err == nil {
				break
			}
		}
		if err != nil {
			t.Errorf("host-a, back before its fence record, could not start the VM: %v", err)
			return
		}
		if err := a.Fake().StartDomain(ctx, vm.UUID); err != nil {
			t.Errorf("start on host-a: %v", err)
		}
	}
	if err := a.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "host-b promoted and runs the VM", 2*time.Minute, func() bool {
		owner, gen := ownerOf(ctx, f, vm)
		return owner == fleet.HostB && gen == 2 && b.Running(ctx, vm)
	})
	if !back.Load() {
		t.Fatal("host-a never came back between the fence and the record: the test did not run its case")
	}
	if a.Running(ctx, vm) {
		t.Fatal("the VM runs on host-a and on host-b")
	}
	if got, err := b.TenantSecret(ctx, vm); err != nil || got != secret {
		t.Fatalf("tenant secret on host-b: %q %v, want %q", got, err, secret)
	}
}
