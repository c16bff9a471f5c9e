package inproc_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/test/fleet"
)

// TestHookStartGate (model findings F1, F3) on real daemons in hook mode:
// a plain migration A -> B fails after B's "migrate begin" pulled the key,
// so B holds it PENDING while the VM still runs on A. Then vtpmd on B
// refuses, naming the rule:
//   - "prepare begin" (a cold start of the VM on B from the PENDING key,
//     or a late one of the failed migration): the source confirms no job;
//   - "migrate begin" without a migration job on A: the PENDING key is not
//     reused (and A's transaction is still open, so it stays).
//
// Recovery then gives the VM back to A alone, and a plain migration works.
func TestHookStartGate(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t, true)
	a, b := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB)
	vm, err := f.CreateVM(ctx, fleet.HostA, "gate-1")
	if err != nil {
		t.Fatal(err)
	}
	pull := b.Fake().MigrateBegin
	b.Fake().MigrateBegin = func(ctx context.Context, id, name string) error {
		if err := pull(ctx, id, name); err != nil {
			return err
		}
		return errors.New("a later step of the incoming migration failed")
	}
	if err := a.PlainMigrate(ctx, vm, fleet.HostB); err == nil {
		t.Fatal("the failing migration succeeded")
	}
	b.Fake().MigrateBegin = pull
	req := adminapi.HookRequest{UUID: vm.UUID, Name: vm.Name}
	if resp, err := b.Admin().HookPrepare(ctx, req); err == nil || !strings.Contains(err.Error(), "rule "+migrate.RuleIncomingJob) {
		t.Fatalf("prepare begin on B from the PENDING key: %+v %v, want a refusal naming rule %s", resp, err, migrate.RuleIncomingJob)
	} else {
		t.Logf("prepare begin refused: %v", err)
	}
	if resp, err := b.Admin().HookPull(ctx, req); err == nil || !strings.Contains(err.Error(), "rule "+migrate.RuleIncomingJob) {
		t.Fatalf("migrate begin on B without a job on A: %+v %v, want a refusal naming rule %s", resp, err, migrate.RuleIncomingJob)
	} else {
		t.Logf("migrate begin refused: %v", err)
	}
	if err := fleet.WaitOwner(ctx, f, vm, fleet.HostA, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := a.PlainMigrate(ctx, vm, fleet.HostB); err != nil {
		t.Fatalf("plain migration after recovery: %v", err)
	}
	if err := fleet.WaitOwner(ctx, f, vm, fleet.HostB, time.Minute); err != nil {
		t.Fatal(err)
	}
}
