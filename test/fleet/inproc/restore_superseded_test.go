package inproc_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/recovery"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// TestRestoreOverSupersededCopy (a replay of soak seed 6014): host-a's
// VM fails over to its standby host-b (generation 2) while host-a is down;
// host-b then loses its TPM before host-a, back, could have its stale copy
// (generation 1) confirmed and shredded. The operator restores host-b's
// bundle onto host-a: the restore replaces host-a's superseded copy (the
// registry shows it two generations behind the restore), and the VM runs
// there at generation 3 with the secret the tenant sealed on host-b. Before the fix the
// restore was refused (rule owned-here) and no host could ever run the VM
// again. host-a's stale copy never starts meanwhile.
func TestRestoreOverSupersededCopy(t *testing.T) {
	t.Parallel()
	c := newCustodians(t)
	dir := t.TempDir()
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "auto", func(cfg *inproc.Config) {
		cfg.Registry = registry.ModeEtcd // two hosts down at once keep the quorum
		standby := cfg.Configure
		cfg.Configure = func(h string, dc *daemon.Config) {
			standby(h, dc)
			dc.Escrow = c.cfg
			dc.Backup = daemon.BackupConfig{Dir: dir, Keep: 2}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	a, b, relay := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB), f.InProcHost(fleet.HostC)
	op := f.Operator()
	vm, err := f.CreateVM(ctx, fleet.HostA, "superseded-1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm.UUID, On: []string{fleet.HostB}}); err != nil {
		t.Fatal(err)
	}
	waitReplicas(t, f, vm, 1, fleet.HostB)
	if err := a.Crash(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "host-b promoted and runs the VM", 2*time.Minute, func() bool {
		owner, gen := ownerOf(ctx, f, vm)
		return owner == fleet.HostB && gen == 2 && b.Running(ctx, vm)
	})
	// The tenant seals a new secret on host-b: host-a's stale state does
	// not hold it, the bundle does.
	secret, err := b.TenantReseal(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	bundle := backupBundle(ctx, t, b, vm)

	// host-b's TPM dies; the operator retires it; host-a comes back with
	// its stale copy, which nobody can confirm stale any more.
	if err := b.LoseTPM(ctx); err != nil {
		t.Fatal(err)
	}
	retireHost(ctx, t, op, fleet.HostB)
	if err := a.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if g, err := fleet.Generation(ctx, a, vm); err != nil || g != 1 {
		t.Fatalf("host-a holds generation %d (%v), not its stale copy at 1: this test needs it", g, err)
	}
	if _, err := a.Daemon().Node().CheckStart(ctx, vm.UUID); !errors.Is(err, migrate.ErrNotOwner) {
		t.Fatalf("host-a may start its stale copy: %v", err)
	}

	// The restore onto host-a replaces the superseded copy.
	r := &recovery.Restorer{Admin: relay.Admin(), Registry: op}
	res, err := r.Restore(ctx, recovery.Request{Bundle: bundle, Identities: c.identities(t, "alice", "bob"), VM: vm.UUID, Dest: fleet.HostA})
	if err != nil {
		t.Fatalf("restore onto host-a, which holds a superseded copy: %v", err)
	}
	if owner, gen := ownerOf(ctx, f, vm); owner != fleet.HostA || gen != 3 {
		t.Fatalf("after the restore the registry shows %s at %d, want host-a at 3 (%+v)", owner, gen, res)
	}
	if err := a.Fake().StartDomain(ctx, vm.UUID); err != nil {
		t.Fatalf("start on host-a: %v", err)
	}
	if got, err := a.TenantSecret(ctx, vm); err != nil || got != secret {
		t.Fatalf("tenant secret on host-a: %q, %v; want %q", got, err, secret)
	}
}
