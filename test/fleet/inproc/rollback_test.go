package inproc_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
	"github.com/vtpmm/vtpmm/vtpm"
)

// TestRolledBackSourceMidMigration (model finding F13, docs/model.md): the
// source's whole data directory is restored from a backup taken before a
// migration while that migration is open (the VM already runs on the
// destination with its PENDING key). The source's vtpmd must refuse to
// start on it (rollback), because the anchor counted the open transaction
// at the source's Begin; before the fix the anchor counted only commits,
// the restored directory passed, and the source's start gate and ownership
// sync took the VM back while the destination ran it. With the newest
// directory back, the migration settles on B alone at generation 2.
func TestRolledBackSourceMidMigration(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	// The registry is an external cluster: the data directory restored
	// is the host's alone (an embedded member lives in it).
	f := newFleetWith(t, inproc.Config{Registry: registry.ModeEtcd, Hosts: []inproc.HostSpec{{Name: fleet.HostA}, {Name: fleet.HostB}}})
	a := f.InProcHost(fleet.HostA)
	vm, err := f.CreateVM(ctx, fleet.HostA, "f13-1")
	if err != nil {
		t.Fatal(err)
	}
	data := a.Config().DataDir
	backup := data + ".backup"
	if err := a.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	copyDir(t, data, backup)
	if err := a.Restart(ctx); err != nil {
		t.Fatal(err)
	}

	// A dies right after the hypervisor moved the VM: the transaction is
	// open in A's ledger and in the registry, B holds the PENDING key.
	a.OnCrashPoint(func(p migrate.CrashPoint) error {
		if p != migrate.SrcAfterHypervisor {
			return nil
		}
		if err := a.Kill(ctx); err != nil {
			return err
		}
		return fmt.Errorf("%w at %s (test)", migrate.ErrCrash, p)
	})
	if err := migrateVM(ctx, f, vm, fleet.HostA, fleet.HostB); err == nil {
		t.Fatal("the migration finished although its source died")
	}
	a.OnCrashPoint(nil)
	if err := a.WaitStopped(ctx); err != nil {
		t.Fatal(err)
	}

	// The operator restores A's data directory from the old backup.
	newest := putBackup(t, data, backup)
	err = a.Restart(ctx)
	if !errors.Is(err, vtpm.ErrRollback) {
		t.Fatalf("restart of A on a directory restored from before the open migration: %v, want the rollback refusal", err)
	}
	t.Logf("restored directory refused: %v", err)

	// The newest directory back: A recovers the migration, which commits.
	putNewest(t, data, newest)
	if err := a.Restart(ctx); err != nil {
		t.Fatalf("restart on the newest directory: %v", err)
	}
	if err := fleet.WaitOwner(ctx, f, vm, fleet.HostB, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	if gen, err := fleet.Generation(ctx, f.Host(fleet.HostB), vm); err != nil || gen != 2 {
		t.Fatalf("generation on B: %d, %v, want 2", gen, err)
	}
}
