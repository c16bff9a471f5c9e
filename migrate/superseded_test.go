package migrate_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vtpmm/vtpmm/migrate"
)

// TestSupersededSourceTransactionClosed is soak seed 2's finding (wave 5):
// host-a's migration of the VM to host-b is cut after the hypervisor moved
// it (the source gone at src/after-hypervisor: its transaction stays open,
// Finish never reaches host-b). host-b, the source gone and the VM running
// there, commits in the registry itself; then it migrates the VM on to
// host-d. When host-a comes back, the registry shows host-d two
// generations on: host-a's transaction can neither commit nor abort in the
// registry. Recovery closes it keeping the copy (never on the registry's
// word alone), and the ownership sync shreds the copy once host-d confirms
// over the agent wire. Before the fix recovery answered "another change
// superseded transaction" on every round and the ownership sync skipped
// the VM (an open transaction held it): the stale copy stayed for good.
func TestSupersededSourceTransactionClosed(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	f.useRegistry("etcd")
	a, b, d := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog), f.addHost("host-d", goodLog)
	vm := a.sealedVM("vm1", []byte("before the cut"))
	keyFile := filepath.Join(a.dir, "keys", vm+".key")

	a.migrateCrashing(ctx, vm, "host-b", migrate.SrcAfterHypervisor)
	if err := b.node.Reconcile(ctx); err != nil { // the source is gone, the VM runs here: commit
		t.Fatalf("host-b's recovery with host-a gone: %v", err)
	}
	if _, err := b.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-d"}, nil); err != nil {
		t.Fatalf("host-b -> host-d: %v", err)
	}

	a.restart()
	if _, err := a.node.CheckStart(ctx, vm); !errors.Is(err, migrate.ErrNotOwner) {
		t.Fatalf("host-a's start with its transaction open: %v", err)
	}
	d.down = true // the owner cannot confirm yet: the copy stays
	if err := a.node.Reconcile(ctx); err != nil {
		t.Fatalf("host-a's recovery of the superseded transaction: %v", err)
	}
	if open, _ := a.ledger.OpenTxs(); len(open) != 0 {
		t.Fatalf("host-a: %d open transactions after recovery: %+v", len(open), open)
	}
	if _, err := a.node.SyncOwnership(ctx); err == nil {
		t.Fatal("ownership sync with the owner down: no error, want the copy kept")
	}
	if _, err := os.Stat(keyFile); err != nil {
		t.Fatalf("host-a's copy went before the owner confirmed: %v", err)
	}
	if _, err := a.node.CheckStart(ctx, vm); !errors.Is(err, migrate.ErrNotOwner) {
		t.Fatalf("host-a's start of its stale copy: %v", err)
	}
	d.down = false
	rep, err := a.node.SyncOwnership(ctx)
	if err != nil || len(rep.Shredded) != 1 {
		t.Fatalf("ownership sync once host-d answers: %+v %v", rep, err)
	}
	f.checkSingleOwner(vm, "host-d")
	a.checkAnchor()
	if got := string(d.guestUnseal(vm)); got != "before the cut" {
		t.Fatalf("guest secret on host-d: %q", got)
	}
	if n := a.audit.count("stale-copy-shredded"); n != 1 {
		t.Errorf("%d stale-copy-shredded audit events on host-a", n)
	}
}
