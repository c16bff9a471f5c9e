package soak_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/guestseal"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
	"github.com/vtpmm/vtpmm/test/soak"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
)

// TestSoakDetects proves the end checks can fail, as the model's
// mutations do for its properties: a schedule without steps on a fleet
// broken after its set-up must report the violation named.
func TestSoakDetects(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, rule string
		mutate     func(ctx context.Context, f *inproc.Fleet, vms []fleet.VM) error
	}{
		// The tenant's vTPM no longer holds the secret sealed at
		// creation (a lost or replaced vTPM).
		{"replaced vTPM", "lost-vtpm", func(ctx context.Context, f *inproc.Fleet, vms []fleet.VM) error {
			uri, err := f.InProcHost(fleet.HostA).Fake().VTPMURI(vms[0].UUID)
			if err != nil {
				return err
			}
			tpm, err := vtpm.Open(ctx, uri)
			if err != nil {
				return err
			}
			defer tpm.Close()
			return guestseal.Seal(ctx, tpm, []byte("another secret"), []int{16})
		}},
		// The registry names host-b the owner at the next generation,
		// which host-b never received: nobody may start the VM.
		{"registry ahead of every key", "not-settled", func(ctx context.Context, f *inproc.Fleet, vms []fleet.VM) error {
			view, err := f.Operator().VMs(ctx, vms[1].UUID)
			if err != nil {
				return err
			}
			rec := view.VMs[vms[1].UUID]
			_, err = f.Operator().Bump(ctx, registry.Bump{VM: rec.ID, Expect: &rec, Owner: fleet.HostB, Generation: rec.Generation + 1})
			return err
		}},
		// Someone starts vm-1 on host-b behind vtpmm's back (its start
		// hook bypassed, on a vTPM of its own): the VM runs on two hosts
		// while every start rule is right (seed 4018's shape).
		{"VM started twice", "two-running", func(ctx context.Context, f *inproc.Fleet, vms []fleet.VM) error {
			b := f.InProcHost(fleet.HostB).Fake()
			pass := []byte("a rogue vTPM's passphrase, 32 b")
			state := t.TempDir()
			if err := swtpm.Setup(ctx, swtpm.SetupConfig{StateDir: state, VMID: vms[0].UUID, VMName: vms[0].Name, Passphrase: pass}); err != nil {
				return err
			}
			if err := b.DefineSecret(ctx, vms[0].UUID, pass); err != nil {
				return err
			}
			if err := b.DefineVTPMDomain(ctx, hypervisor.Domain{UUID: vms[0].UUID, Name: vms[0].Name}, state); err != nil {
				return err
			}
			hook := b.PrepareBegin
			b.PrepareBegin = nil
			defer func() { b.PrepareBegin = hook }()
			return b.StartDomain(ctx, vms[0].UUID)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			h, err := soak.Run(ctx, soak.Config{Seed: 1, Steps: -1, VMs: 2, Registry: registry.ModeEtcd, SettleTimeout: 10 * time.Second, Mutate: tc.mutate})
			if !errors.Is(err, soak.ErrViolation) {
				t.Fatalf("broken fleet: %v, want %v\n%s", err, soak.ErrViolation, h)
			}
			for _, v := range h.Violations {
				if v.Rule == tc.rule {
					t.Logf("detected: %s: %s", v.Rule, v.Detail)
					return
				}
			}
			t.Fatalf("violations %+v, want one of rule %s\n%s", h.Violations, tc.rule, h)
		})
	}
}
