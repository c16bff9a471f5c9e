//go:build e2e

package e2e_test

import (
	"context"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/test/lab"
)

// TestNodeMigrateABA moves a firmware-only VM with an encrypted vTPM
// A->B->A through migrate.Node over real libvirt: after each move the VM
// runs on exactly one host, the new owner holds the key with the next
// generation and the old one no longer does.
func TestNodeMigrateABA(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	f := newFleet(ctx, t)
	a := f.addAgent(ctx, "host-a", "10.251.0.1", goodLog)
	b := f.addAgent(ctx, "host-b", "10.251.0.2", goodLog)
	vm := createVM(ctx, t, a.keys, a.host, "e2evm")
	_, gen, err := a.keys.Get(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	for i, hop := range []struct{ src, dst *agent }{{a, b}, {b, a}} {
		t0 := time.Now()
		res, err := hop.src.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: hop.dst.host.Name},
			func(p migrate.Phase, d string) { t.Logf("  %s: %s (%v)", p, d, time.Since(t0).Round(time.Millisecond)) })
		if err != nil {
			t.Fatalf("hop %d %s->%s: %v", i+1, hop.src.host.Name, hop.dst.host.Name, err)
		}
		t.Logf("hop %d %s->%s via vtpmm: %v (warm=%v)", i+1, hop.src.host.Name, hop.dst.host.Name,
			time.Since(t0).Round(time.Millisecond), res.Warm)
		if len(res.Committed) != 1 {
			t.Fatalf("hop %d: committed %v, failed %v", i+1, res.Committed, res.Failed)
		}
		if js, err := hop.dst.host.Hyp.CompletedJobStats(ctx, vm); err == nil {
			t.Logf("  libvirt job: elapsed %v, downtime %v", js.Elapsed, js.Downtime)
		}
		wantState(ctx, t, vm, map[*lab.Host]hypervisor.State{hop.src.host: hypervisor.StateAbsent, hop.dst.host: hypervisor.StateRunning})
		_, g, err := hop.dst.keys.Get(ctx, vm)
		if err != nil {
			t.Fatalf("hop %d: destination key: %v", i+1, err)
		}
		if g != gen+1 {
			t.Errorf("hop %d: generation %d, want %d", i+1, g, gen+1)
		}
		gen = g
		if _, _, err := hop.src.keys.Get(ctx, vm); err == nil {
			t.Errorf("hop %d: source still holds the key", i+1)
		}
		if has, _ := hop.src.host.Hyp.HasSecret(ctx, vm); has {
			t.Errorf("hop %d: source still has the libvirt secret", i+1)
		}
	}
}

// TestNodeRefusesUntrustedBoot: a destination whose host TPM booted a log
// outside the policy is refused before libvirt is asked; the VM stays on A
// and no secret reaches the destination's libvirt.
func TestNodeRefusesUntrustedBoot(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	f := newFleet(ctx, t)
	a := f.addAgent(ctx, "host-a", "10.251.0.1", goodLog)
	c := f.addAgent(ctx, "host-c", "10.251.0.3", badLog)
	vm := createVM(ctx, t, a.keys, a.host, "e2evm")
	t0 := time.Now()
	_, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-c"}, nil)
	t.Logf("refusal after %v: %v", time.Since(t0).Round(time.Millisecond), err)
	if err == nil {
		t.Fatal("migration to a host with an untrusted boot succeeded")
	}
	wantState(ctx, t, vm, map[*lab.Host]hypervisor.State{a.host: hypervisor.StateRunning, c.host: hypervisor.StateAbsent})
	if has, err := c.host.Hyp.HasSecret(ctx, vm); err != nil || has {
		t.Errorf("secret on the refused host: has=%v err=%v", has, err)
	}
	if _, _, err := a.keys.Get(ctx, vm); err != nil {
		t.Errorf("source lost its key: %v", err)
	}
}
