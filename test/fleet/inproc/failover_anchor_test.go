package inproc_test

import (
	"context"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/test/fleet"
)

// TestFailoverAnchorSettled (found on the libvirt lab, TestE2EFailover):
// a promotion's step of the rollback anchor must record what the key
// store holds after it (the VM at the new generation). It recorded the VM
// as released (generation 0), so the settle failed ("the key store holds
// generation 2, the anchor recorded generation 0") and the promoted
// host's vtpmd refused to start at its next restart. Here host-b promotes
// after host-a crashed, is restarted, starts, and still owns the VM.
func TestFailoverAnchorSettled(t *testing.T) {
	ctx := context.Background()
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "auto")
	a, b := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB)
	vm, err := f.CreateVM(ctx, fleet.HostA, "anchor-1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm.UUID, On: []string{fleet.HostB}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "host-b's replica at generation 1", time.Minute, func() bool { return standbyGen(ctx, f, vm, fleet.HostB) == 1 })
	if err := a.Crash(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "host-b promoted", 2*time.Minute, func() bool {
		owner, gen := ownerOf(ctx, f, vm)
		return owner == fleet.HostB && gen == 2
	})
	waitFor(t, "the VM runs on host-b", time.Minute, func() bool { return b.Running(ctx, vm) })
	if err := b.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.Restart(ctx); err != nil {
		t.Fatalf("host-b's vtpmd after its promotion does not start again: %v", err)
	}
	if _, err := b.Daemon().Node().CheckStart(ctx, vm.UUID); err != nil {
		t.Fatalf("host-b restarted may not start the VM it owns: %v", err)
	}
}
