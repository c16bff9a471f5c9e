package migrate_test

import (
	"context"
	"errors"
	"strings"
	"testing"

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
			f := newFleet(t)
			if reg != "none" {
				f.useRegistry(reg)
			}
			a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
			vm := a.createVM("vm1")
			f.crash["host-a"] = migrate.CrashAt(migrate.SrcAfterPrepared)
			if _, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil); !errors.Is(err, migrate.ErrCrash) {
				t.Fatalf("migration with a crash after prepared: %v", err)
			}
			delete(f.crash, "host-a")
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
