package fake_test

import (
	"context"
	"errors"
	"testing"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/fake"
)

// TestPowerCycle: a power cycle (a fence agent's power-off) stops every
// running VM, makes a start in flight fail, and leaves libvirt with no
// secret, so a later start without vtpmd's hook fails until the secret is
// defined again. The domains stay defined.
func TestPowerCycle(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t)
	_, hosts := newHosts(t, "a")
	a := hosts[0]
	running, starting := newVM(t, a), newVM(t, a)
	if err := a.DestroyDomain(ctx, starting.uuid); err != nil {
		t.Fatal(err)
	}
	// The power goes while the second VM's start waits in its hook.
	a.PrepareBegin = func(ctx context.Context, vm, _ string) error {
		if vm == starting.uuid {
			return a.PowerCycle(ctx)
		}
		return nil
	}
	if err := a.StartDomain(ctx, starting.uuid); !errors.Is(err, hypervisor.ErrSecretMissing) {
		t.Fatalf("a start in flight across a power cycle: %v, want it to fail (no secret after the boot)", err)
	}
	a.PrepareBegin = nil
	for _, v := range []vm{running, starting} {
		d, err := a.Domain(ctx, v.uuid)
		if err != nil || d.State != hypervisor.StateShutoff {
			t.Fatalf("domain %s after the power cycle: %+v, %v; want defined, shut off", v.uuid, d, err)
		}
		if has, err := a.HasSecret(ctx, v.uuid); err != nil || has {
			t.Fatalf("secret of %s after the power cycle: %v, %v; want it forgotten", v.uuid, has, err)
		}
	}
	if err := a.StartDomain(ctx, running.uuid); !errors.Is(err, hypervisor.ErrSecretMissing) {
		t.Fatalf("start after the power cycle without the secret: %v, want ErrSecretMissing", err)
	}
	// The power goes after libvirt read the secret and swtpm is up, just
	// before the domain counts as running: it is not running after the boot.
	defineSecret(t, a, running.uuid, running.key)
	a.BeforeStartCommit = func() {
		if err := a.PowerCycle(ctx); err != nil {
			t.Error(err)
		}
	}
	if err := a.StartDomain(ctx, running.uuid); !errors.Is(err, fake.ErrPowerCycled) {
		t.Fatalf("a start whose vTPM came up across a power cycle: %v, want ErrPowerCycled", err)
	}
	a.BeforeStartCommit = nil
	if d, err := a.Domain(ctx, running.uuid); err != nil || d.State != hypervisor.StateShutoff {
		t.Fatalf("domain after a power cut during its start: %+v, %v; want shut off", d, err)
	}
	defineSecret(t, a, running.uuid, running.key)
	if err := a.StartDomain(ctx, running.uuid); err != nil {
		t.Fatalf("start once the secret is defined again: %v", err)
	}
}
