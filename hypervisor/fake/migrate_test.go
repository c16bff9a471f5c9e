package fake_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/fake"
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
)

// TestMigrateFailureKeepsVMOnSource: every failed migration leaves the VM
// running on the source with a working vTPM that still unseals what the
// guest sealed (PCR-bound, so its volatile state survived), leaves nothing
// on the destination, and does not stand in the way of a later migration
// once the cause is fixed.
func TestMigrateFailureKeepsVMOnSource(t *testing.T) {
	t.Parallel()
	boom := errors.New("boom")
	for _, tc := range []struct {
		name    string
		arrange func(t *testing.T, e env) hypervisor.Target
		want    []error
		msg     string
		fix     func(t *testing.T, e env)
	}{
		{
			name: "secret missing on destination",
			arrange: func(t *testing.T, e env) hypervisor.Target {
				return e.dst.Target()
			},
			want: []error{hypervisor.ErrSecretMissing},
			msg:  "Secret not found: no secret with matching uuid '",
			fix: func(t *testing.T, e env) {
				defineSecret(t, e.dst, e.v.uuid, e.v.key)
			},
		},
		{
			name: "wrong secret on destination",
			arrange: func(t *testing.T, e env) hypervisor.Target {
				defineSecret(t, e.dst, e.v.uuid, randBytes(t, 32))
				return e.dst.Target()
			},
			want: []error{hypervisor.ErrSecretMismatch, swtpm.ErrWrongPassphrase},
			msg:  "operation failed: job 'migration out' unexpectedly failed",
			fix: func(t *testing.T, e env) {
				defineSecret(t, e.dst, e.v.uuid, e.v.key)
			},
		},
		{
			name: "destination down",
			arrange: func(t *testing.T, e env) hypervisor.Target {
				defineSecret(t, e.dst, e.v.uuid, e.v.key)
				if err := e.n.SetDown(e.dst.Name(), true); err != nil {
					t.Fatal(err)
				}
				return e.dst.Target()
			},
			want: []error{hypervisor.ErrUnreachable},
			msg:  "host is down",
			fix: func(t *testing.T, e env) {
				if err := e.n.SetDown(e.dst.Name(), false); err != nil {
					t.Fatal(err)
				}
			},
		},
		{
			name: "unknown destination",
			arrange: func(t *testing.T, e env) hypervisor.Target {
				defineSecret(t, e.dst, e.v.uuid, e.v.key)
				return hypervisor.Target{Name: "nowhere", URI: "fake://nowhere"}
			},
			want: []error{hypervisor.ErrUnreachable},
			msg:  "no such host",
		},
		{
			name: "FailNextMigrate",
			arrange: func(t *testing.T, e env) hypervisor.Target {
				defineSecret(t, e.dst, e.v.uuid, e.v.key)
				e.src.FailNextMigrate = boom
				return e.dst.Target()
			},
			want: []error{boom},
			msg:  "boom",
		},
		{
			name: "BeforeMigrateCommit fails",
			arrange: func(t *testing.T, e env) hypervisor.Target {
				defineSecret(t, e.dst, e.v.uuid, e.v.key)
				e.src.BeforeMigrateCommit = func() error {
					// The state was copied: the destination has the VM, paused.
					if d, err := e.dst.Domain(context.Background(), e.v.uuid); err != nil || d.State != hypervisor.StatePaused {
						t.Errorf("destination domain during the migration = %+v, %v; want paused", d, err)
					}
					return boom
				}
				return e.dst.Target()
			},
			want: []error{hypervisor.ErrMigrationFailed, boom},
			msg:  "operation failed: job 'migration out' unexpectedly failed",
			fix: func(t *testing.T, e env) {
				e.src.BeforeMigrateCommit = nil
			},
		},
		{
			name: "BeforeMigrateCommit fails, source resumed in a new swtpm",
			arrange: func(t *testing.T, e env) hypervisor.Target {
				defineSecret(t, e.dst, e.v.uuid, e.v.key)
				fake.SetResumeByRestart(e.src, true)
				// The source needs no secret to migrate out, nor to resume.
				if err := e.src.UndefineSecret(context.Background(), e.v.uuid); err != nil {
					t.Fatal(err)
				}
				e.src.BeforeMigrateCommit = func() error { return boom }
				return e.dst.Target()
			},
			want: []error{hypervisor.ErrMigrationFailed, boom},
			msg:  "operation failed: job 'migration out' unexpectedly failed",
			fix: func(t *testing.T, e env) {
				e.src.BeforeMigrateCommit = nil
			},
		},
		{
			name: "cancelled before the commit",
			arrange: func(t *testing.T, e env) hypervisor.Target {
				defineSecret(t, e.dst, e.v.uuid, e.v.key)
				e.src.BeforeMigrateCommit = func() error { e.cancel(); return nil }
				return e.dst.Target()
			},
			want: []error{hypervisor.ErrMigrationFailed, context.Canceled},
			msg:  "context canceled",
			fix: func(t *testing.T, e env) {
				e.src.BeforeMigrateCommit = nil
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := ctxT(t)
			mctx, cancel := context.WithCancel(ctx)
			defer cancel()
			n, hosts := newHosts(t, "a", "b")
			src, dst := hosts[0], hosts[1]
			v := newVM(t, src)
			e := env{n: n, src: src, dst: dst, v: v, cancel: cancel}
			secret := []byte("tenant LUKS key")
			bootAndSeal(t, src, v.uuid, secret)
			target := tc.arrange(t, e)

			err := src.Migrate(mctx, v.uuid, target)
			t.Logf("Migrate: %v", err)
			for _, w := range tc.want {
				if !errors.Is(err, w) {
					t.Errorf("Migrate = %v; want %v", err, w)
				}
			}
			if err != nil && !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("Migrate error %q does not say %q", err, tc.msg)
			}
			checkVTPM(t, src, v.uuid, secret)
			checkAbsent(t, dst, v.uuid)
			if s := src.Stats(); s.MigrationsFailed != 1 || s.MigrationsOut != 0 {
				t.Errorf("source stats = %+v; want 1 failed, 0 out", s)
			}
			if err := swtpm.CheckEncryptedAtRest(v.state); err != nil {
				t.Error(err)
			}
			if tc.fix == nil {
				return
			}
			// Once the cause is fixed, the VM migrates with its state.
			tc.fix(t, e)
			if err := src.Migrate(ctx, v.uuid, dst.Target()); err != nil {
				t.Fatalf("Migrate after fixing: %v", err)
			}
			checkVTPM(t, dst, v.uuid, secret)
			checkAbsent(t, src, v.uuid)
		})
	}
}

// env is one failure case's world.
type env struct {
	n        *fake.Network
	src, dst *fake.Host
	v        vm
	cancel   context.CancelFunc // cancels the Migrate call's context
}

func defineSecret(t *testing.T, h *fake.Host, uuid string, value []byte) {
	t.Helper()
	if err := h.DefineSecret(context.Background(), uuid, value); err != nil {
		t.Fatal(err)
	}
}

// TestMigrateRoundTrip moves a VM A→B→A→B; what the guest sealed on A
// unseals after every move, and each source is left empty.
func TestMigrateRoundTrip(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t)
	_, hosts := newHosts(t, "a", "b")
	a, b := hosts[0], hosts[1]
	v := newVM(t, a)
	defineSecret(t, b, v.uuid, v.key)
	secret := []byte("workload key")
	bootAndSeal(t, a, v.uuid, secret)

	for i, hop := range []struct{ from, to *fake.Host }{{a, b}, {b, a}, {a, b}} {
		if err := hop.from.Migrate(ctx, v.uuid, hop.to.Target()); err != nil {
			t.Fatalf("hop %d %s→%s: %v", i, hop.from.Name(), hop.to.Name(), err)
		}
		checkVTPM(t, hop.to, v.uuid, secret)
		checkAbsent(t, hop.from, v.uuid)
		if _, err := hop.from.VTPMURI(v.uuid); !errors.Is(err, hypervisor.ErrNoDomain) {
			t.Errorf("VTPMURI on the source after hop %d = %v; want ErrNoDomain", i, err)
		}
		// libvirt leaves the source's secret alone; vtpmm cleans up.
		if ok, err := hop.from.HasSecret(ctx, v.uuid); err != nil || !ok {
			t.Errorf("source secret after hop %d: %v, %v; want still defined", i, ok, err)
		}
		if i == 0 {
			if _, err := os.Stat(v.state); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("source state dir %s after migrating out: %v; want removed", v.state, err)
			}
		}
	}
	if sa, sb := a.Stats(), b.Stats(); sa.MigrationsOut != 2 || sa.MigrationsIn != 1 || sb.MigrationsOut != 1 || sb.MigrationsIn != 2 ||
		sa.MigrationsFailed+sb.MigrationsFailed != 0 || sa.LastMigration <= 0 {
		t.Errorf("stats a=%+v b=%+v", sa, sb)
	}
	// The state that arrived is the destination's own, encrypted at rest,
	// and cold-starts there with the secret.
	state := filepath.Join(b.Dir(), "vms", v.uuid, "tpm2")
	if err := swtpm.CheckEncryptedAtRest(state); err != nil {
		t.Fatal(err)
	}
	if err := b.DestroyDomain(ctx, v.uuid); err != nil {
		t.Fatal(err)
	}
	if err := b.StartDomain(ctx, v.uuid); err != nil {
		t.Fatal(err)
	}
	// A reboot resets PCRs; the guest measures the same boot and unseals.
	guest(t, b, v.uuid, func(tpm transport.TPM) { measureBoot(t, tpm) })
	checkVTPM(t, b, v.uuid, secret)
}

// TestMigrateTwiceAtOnce: a second migration of a VM that is migrating is
// refused like libvirt does; the first one then completes.
func TestMigrateTwiceAtOnce(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t)
	_, hosts := newHosts(t, "a", "b")
	a, b := hosts[0], hosts[1]
	v := newVM(t, a)
	defineSecret(t, b, v.uuid, v.key)
	secret := []byte("ssh host key")
	bootAndSeal(t, a, v.uuid, secret)
	var second error
	a.BeforeMigrateCommit = func() error {
		second = a.Migrate(ctx, v.uuid, b.Target())
		if d, err := a.Domain(ctx, v.uuid); err != nil || d.State != hypervisor.StatePaused {
			t.Errorf("source domain during the migration = %+v, %v; want paused", d, err)
		}
		if _, err := a.VTPMURI(v.uuid); !errors.Is(err, hypervisor.ErrNotRunning) {
			t.Errorf("VTPMURI of a paused VM = %v; want ErrNotRunning", err)
		}
		if err := a.DestroyDomain(ctx, v.uuid); !errors.Is(err, fake.ErrBusy) {
			t.Errorf("DestroyDomain during the migration = %v; want ErrBusy", err)
		}
		return nil
	}
	if err := a.Migrate(ctx, v.uuid, b.Target()); err != nil {
		t.Fatal(err)
	}
	t.Logf("second Migrate: %v", second)
	if !errors.Is(second, hypervisor.ErrMigrationFailed) || !errors.Is(second, fake.ErrBusy) ||
		!strings.Contains(second.Error(), "domain is already being migrated") {
		t.Errorf("second Migrate = %v; want ErrMigrationFailed, domain is already being migrated", second)
	}
	checkVTPM(t, b, v.uuid, secret)
	checkAbsent(t, a, v.uuid)
}
