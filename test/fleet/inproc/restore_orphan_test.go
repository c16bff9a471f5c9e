package inproc_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/recovery"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// TestRestoreClosesRetiredOwnersIntent (TestSoakFailover in CI, seed 4):
// host-b opened a migration of its VM to host-a in the registry (an
// evacuation's claim) and died before any Prepare reached host-a; the
// operator retires host-b. The intent, which host-b can never finish,
// blocked the VM's restore for good ("let it finish first"). The restore
// now closes it once host-a, asked, never recorded the transaction, and
// the VM runs again on host-a with its tenant's secret. While host-b is
// not retired, the intent stays and the restore is refused.
func TestRestoreClosesRetiredOwnersIntent(t *testing.T) {
	t.Parallel()
	c := newCustodians(t)
	f := escrowFleet(t, c, t.TempDir(), "", inproc.Config{Registry: registry.ModeEtcd})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	a, b := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB)
	op := f.Operator()
	vm, err := f.CreateVM(ctx, fleet.HostB, "orphan-1")
	if err != nil {
		t.Fatal(err)
	}
	want, err := b.TenantSecret(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	bundle := backupBundle(ctx, t, b, vm)
	// host-b's claim of a migration to host-a, then host-b dies.
	intent := registry.Batch{TxID: strings.Repeat("4e", 16), From: fleet.HostB, To: fleet.HostA, VMs: []registry.VMGen{{ID: vm.UUID, Generation: 1}}}
	if _, err := op.Begin(ctx, intent); err != nil {
		t.Fatal(err)
	}
	if err := b.LoseTPM(ctx); err != nil {
		t.Fatal(err)
	}
	r := &recovery.Restorer{Admin: a.Admin(), Registry: op}
	req := recovery.Request{Bundle: bundle, Identities: c.identities(t, "alice", "bob"), VM: vm.UUID, Dest: fleet.HostA}
	// Not retired yet: the intent stays, the restore is refused.
	waitNotLive(t, f, fleet.HostB)
	if _, err := r.Restore(ctx, req); !errors.Is(err, migrate.ErrBusy) {
		t.Fatalf("restore while host-b is not retired: %v, want ErrBusy (the intent is open)", err)
	}
	retireHost(ctx, t, op, fleet.HostB)
	res, err := r.Restore(ctx, req)
	if err != nil {
		t.Fatalf("restore once host-b is retired: %v", err)
	}
	if res.Closed != intent.TxID {
		t.Fatalf("the restore closed %q, want the intent %s", res.Closed, intent.TxID)
	}
	if owner, gen := ownerOf(ctx, f, vm); owner != fleet.HostA || gen != 2 {
		t.Fatalf("after the restore the registry shows %s at %d, want host-a at 2", owner, gen)
	}
	startRestored(ctx, t, a, lostVM{vm: vm, bundle: bundle, secret: want})
}
