package inproc_test

import (
	"context"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/operator"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// TestReuniteAfterTPMLossMidMigration (soak seed 6014) on real daemons in
// hook mode, with an external etcd registry: a plain migration moves a VM
// from host-a to host-b, where it runs on its PENDING key; host-a's vtpmd
// dies as the migration ends (it never settles it), then host-b loses its
// TPM and comes back on a new one, its ledger and key store empty, the
// VM's domain and vTPM state still on its disk. host-a, back, keeps the
// key and lists the VM as apart ("domain_on": host-b); the key-only move
// is refused while host-b is retired, and goes through by itself (the
// recovery loop) once the operator re-enrols host-b. The VM then starts
// on host-b and the tenant's secret unseals.
func TestReuniteAfterTPMLossMidMigration(t *testing.T) {
	t.Parallel()
	f := newFleetWith(t, inproc.Config{HookMode: true, Registry: registry.ModeEtcd})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	a, b := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB)
	op := f.Operator()
	vm, err := f.CreateVM(ctx, fleet.HostA, "apart-1")
	if err != nil {
		t.Fatal(err)
	}
	want, err := a.TenantSecret(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	// host-a's vtpmd dies once host-b's start gate admitted the PENDING
	// key (host-a confirmed the migration): the hypervisor finishes it.
	admit := b.Fake().PrepareBegin
	b.Fake().PrepareBegin = func(ctx context.Context, id, name string) error {
		if err := admit(ctx, id, name); err != nil {
			return err
		}
		if err := a.Crash(ctx); err != nil {
			return err
		}
		return a.WaitStopped(ctx)
	}
	if err := a.PlainMigrate(ctx, vm, fleet.HostB); err != nil {
		t.Fatalf("plain migration: %v", err)
	}
	b.Fake().PrepareBegin = admit
	if d, _ := b.Fake().Domain(ctx, vm.UUID); d.State != hypervisor.StateRunning {
		t.Fatalf("the VM does not run on host-b: %s", d.State)
	}

	// host-b's TPM dies; the operator retires it and replaces the TPM.
	if err := b.LoseTPM(ctx); err != nil {
		t.Fatal(err)
	}
	retireHost(ctx, t, op, fleet.HostB)
	if err := b.ReplaceTPM(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	// host-a keeps the key and names where the domain is; host-b, retired,
	// gets nothing yet.
	var note string
	for deadline := time.Now().Add(time.Minute); note == "" && time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		vms, err := a.Admin().VMs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range vms {
			if v.UUID == vm.UUID && v.Owned {
				note = v.DomainOn
			}
		}
	}
	if note != fleet.HostB {
		t.Fatalf("host-a's vm list: domain_on %q, want %s", note, fleet.HostB)
	}
	if owned(ctx, t, b, vm) {
		t.Fatal("host-b holds the key while it is retired")
	}

	// Re-enrolled, host-b receives the key from host-a's recovery loop.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		hv, err := op.Hosts(ctx, fleet.HostB)
		if err == nil && hv.Hosts[fleet.HostB].Host != nil && hv.Hosts[fleet.HostB].Host.Identity.EK != hv.Hosts[fleet.HostB].Enrolment.Identity.EK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("host-b did not register its new TPM identity within 30 s")
		}
	}
	if _, err := operator.Reenroll(ctx, op, a.Admin(), fleet.HostB, operator.EnrollOptions{Wait: 30 * time.Second}); err != nil {
		t.Fatalf("re-enrol host-b: %v", err)
	}
	start := time.Now()
	for !owned(ctx, t, b, vm) {
		if time.Since(start) > 2*time.Minute {
			t.Fatal("the key did not reach host-b within 2 minutes of its re-enrolment")
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("key reunited with its domain %s after the re-enrolment", time.Since(start).Round(time.Millisecond))
	if owned(ctx, t, a, vm) {
		t.Fatal("host-a still holds the key")
	}
	if err := b.Fake().StartDomain(ctx, vm.UUID); err != nil {
		t.Fatalf("start on host-b: %v", err)
	}
	if owner, report, err := fleet.Owner(ctx, f, vm); err != nil || owner != fleet.HostB {
		t.Fatalf("owner %q: %v\n%s", owner, err, report)
	}
	if got, err := b.TenantSecret(ctx, vm); err != nil || got != want {
		t.Fatalf("tenant secret on host-b: %q, %v; want %q", got, err, want)
	}
}

// owned reports whether h's vtpmd owns vm's key.
func owned(ctx context.Context, t *testing.T, h *inproc.Host, vm fleet.VM) bool {
	t.Helper()
	g, err := fleet.Generation(ctx, h, vm)
	if err != nil {
		t.Fatal(err)
	}
	return g > 0
}
