package migrate_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/migrate"
)

// The start gate (CheckStart, DefineSecret, the hook's prepare begin) and
// recovery around an open transaction: the model's findings F1-F6
// (docs/protocol.md, "The start gate").

// TestStartRefusedWhileReleased (F2): once a source has released a VM's
// key (its transaction is open, the destination holds the key PENDING and
// may already run the VM), a cold start on the source is refused, with
// and without a fleet registry (whose record still shows the source at
// its generation); so is one from the destination's PENDING key. After
// recovery the owner starts again.
func TestStartRefusedWhileReleased(t *testing.T) {
	t.Parallel()
	for _, reg := range []string{"none", "fake"} {
		t.Run(reg, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			f, a, b := twoHosts(t, reg)
			vm := a.createVM("vm1")
			a.migrateCrashing(ctx, vm, "host-b", migrate.SrcAfterPrepared)
			a.restart()
			for _, h := range []*host{a, b} {
				_, err := h.node.CheckStart(ctx, vm)
				if !errors.Is(err, migrate.ErrNotOwner) || !strings.Contains(err.Error(), "rule "+migrate.RuleOpenTx) {
					t.Fatalf("%s: start while the transaction is open: %v, want rule %s", h.name, err, migrate.RuleOpenTx)
				}
				if _, err := h.node.DefineSecret(ctx, vm); !errors.Is(err, migrate.ErrNotOwner) {
					t.Fatalf("%s: the hook's start path while the transaction is open: %v", h.name, err)
				}
			}
			if err := errors.Join(a.node.Reconcile(ctx), b.node.Reconcile(ctx)); err != nil {
				t.Fatalf("reconcile: %v", err)
			}
			f.checkSingleOwner(vm, "host-a")
			if _, err := a.node.CheckStart(ctx, vm); err != nil {
				t.Fatalf("start on the owner after recovery: %v", err)
			}
		})
	}
}

// TestPendingKeyServesOnlyItsJob (F1, F3), hook mode with vtpmd's
// prepare-begin hook. A's vtpmm-driven migration to B dies after B holds
// the key PENDING (A's transaction T1 stays open):
//   - "prepare begin" on B without a "migrate begin" (a cold start from
//     the PENDING key) is refused (rule incoming-job);
//   - B's "migrate begin" does not reuse T1's key: A confirms no job for
//     it, and T1 is still open on A, so the pull is refused (ErrBusy).
//
// A then aborts T1 while B is down, so B still holds T1's key: B's next
// "migrate begin" (a plain migration) settles T1 first and pulls a fresh
// key, and the migration ends with B the single owner. Last, a plain
// migration that fails after B's pull leaves B's key PENDING and its
// "migrate begin" mark set: a "prepare begin" then is refused too (the
// source confirms no job).
func TestPendingKeyServesOnlyItsJob(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f, hs := hookFleet(t, time.Nanosecond, "host-a", "host-b")
	a, b := hs[0], hs[1]
	secret := []byte("one job per PENDING key")
	vm := a.sealedVM("vm1", secret)

	a.migrateCrashing(ctx, vm, "host-b", migrate.SrcAfterPrepared)
	a.restart()
	t1, ok := b.node.Incoming(vm)
	if !ok {
		t.Fatal("B holds no PENDING key after A's prepare")
	}
	err := b.prepareBegin(ctx, vm)
	if !errors.Is(err, migrate.ErrNotOwner) || !strings.Contains(err.Error(), "rule "+migrate.RuleIncomingJob) {
		t.Fatalf("cold start on B from T1's PENDING key: %v, want rule %s", err, migrate.RuleIncomingJob)
	}
	t.Logf("cold start refused: %v", err)
	_, err = b.node.RequestPull(ctx, []string{vm}, []string{"host-a"})
	if !errors.Is(err, migrate.ErrBusy) || !strings.Contains(err.Error(), "rule "+migrate.RuleIncomingJob) {
		t.Fatalf("B's pull reusing T1's key without a job: %v, want ErrBusy, rule %s", err, migrate.RuleIncomingJob)
	}
	t.Logf("reuse refused: %v", err)

	b.down = true
	if err := a.node.Reconcile(ctx); err != nil {
		t.Fatalf("A aborts T1 while B is down: %v", err)
	}
	b.down = false
	if tx, ok := b.node.Incoming(vm); !ok || tx.ID != t1.ID {
		t.Fatalf("B should still hold T1's key: %+v %v", tx, ok)
	}
	if err := a.hyp.Migrate(ctx, vm, b.hyp.Target()); err != nil {
		t.Fatalf("plain migration after the aborted T1: %v", err)
	}
	a.settleMoved(ctx, vm, b, secret)

	// A plain migration B -> A that fails after A's pull.
	pull := a.hyp.MigrateBegin
	a.hyp.MigrateBegin = func(ctx context.Context, id, name string) error {
		if err := pull(ctx, id, name); err != nil {
			return err
		}
		return errors.New("a later step of the incoming migration failed")
	}
	if err := b.hyp.Migrate(ctx, vm, a.hyp.Target()); err == nil {
		t.Fatal("the failing migration succeeded")
	}
	a.hyp.MigrateBegin = pull
	if _, ok := a.node.Incoming(vm); !ok {
		t.Fatal("A holds no PENDING key after its pull")
	}
	err = a.prepareBegin(ctx, vm)
	if !errors.Is(err, migrate.ErrNotOwner) || !strings.Contains(err.Error(), "rule "+migrate.RuleIncomingJob) {
		t.Fatalf("start on A from the PENDING key of a failed migration: %v, want rule %s", err, migrate.RuleIncomingJob)
	}
	t.Logf("start after a failed migration refused: %v", err)
	if err := errors.Join(b.node.Reconcile(ctx), a.node.Reconcile(ctx)); err != nil {
		t.Fatalf("reconcile: %v", err)
	}
	f.checkSingleOwner(vm, "host-b")
	for _, h := range []*host{a, b} {
		h.audit.verify(t)
	}
}

// TestRecoveryLeavesARunningJobAlone (F6): vtpmd on the source dies
// during a vtpmm-driven migration while the hypervisor's job goes on (the
// node is rebuilt while the destination prepares, and the old Migrate
// dies once the hypervisor returns). Reconcile on either host during the
// job leaves the transaction open: the source's because its hypervisor
// still migrates the VM, the destination's because the source has not
// decided. And an abort that reaches the destination while its incoming VM
// is paused (its vTPM already runs on the PENDING key's secret) is
// refused. After the job, recovery commits: the VM runs on the
// destination with its key, and nowhere else.
func TestRecoveryLeavesARunningJobAlone(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	secret := []byte("the job outlives vtpmd")
	vm := a.sealedVM("vm1", secret)

	var during, abort error
	b.hyp.PrepareBegin = func(ctx context.Context, id, _ string) error {
		b.hyp.PrepareBegin = nil
		a.restart() // vtpmd on A restarts; its old Migrate is still in the hypervisor
		during = errors.Join(a.node.Reconcile(ctx), b.node.Reconcile(ctx))
		if open, _ := a.ledger.OpenTxs(); len(open) != 1 {
			t.Errorf("reconcile during the hypervisor's job closed the source's transaction: %+v", open)
		}
		return nil
	}
	a.hyp.BeforeMigrateCommit = func() error {
		a.hyp.BeforeMigrateCommit = nil
		tx, ok := b.node.Incoming(vm)
		if !ok {
			t.Error("B holds no PENDING key while its incoming VM is paused")
			return nil
		}
		_, abort = b.node.Finish(ctx, &migrate.FinishRequest{Version: migrate.ProtocolVersion, TxID: tx.ID, Source: "host-a", Abort: []string{vm}})
		return nil
	}
	a.migrateCrashing(ctx, vm, "host-b", migrate.SrcAfterHypervisor)
	t.Logf("reconcile during the job: %v", during)
	if abort == nil || !strings.Contains(abort.Error(), "paused") {
		t.Fatalf("abort on B while its incoming VM is paused: %v, want a refusal", abort)
	}
	t.Logf("abort refused: %v", abort)
	a.restart()
	var err error
	for round := 0; round < 3; round++ {
		if err = errors.Join(a.node.Reconcile(ctx), b.node.Reconcile(ctx)); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("reconcile after the job: %v", err)
	}
	f.checkSingleOwner(vm, "host-b")
	if got := b.guestUnseal(vm); !bytes.Equal(got, secret) {
		t.Fatalf("guest secret on B: %q", got)
	}
}
