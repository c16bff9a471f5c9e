package migrate_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vtpmm/vtpmm/internal/errclass"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
)

// TestRegistryRoundTrips: with a real etcd, a migration batch costs the
// source exactly two registry round trips (Begin, Commit), whatever the
// batch size; the destination promotes from its last view (the source's
// Commit reaches it through its watch) or one read. The numbers are
// reported, not timed.
func TestRegistryRoundTrips(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	f.useRegistry("etcd")
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	vms := []string{a.createVM("vm1"), a.createVM("vm2"), a.createVM("vm3")}
	ra, rb := f.regs["host-a"].(*registry.Client), f.regs["host-b"].(*registry.Client)
	for i, hop := range [][2]*host{{a, b}, {b, a}} {
		src, dst := hop[0], hop[1]
		before := [2]int64{ra.RoundTrips(), rb.RoundTrips()}
		if _, err := src.node.Migrate(ctx, migrate.Request{VMs: vms, Dest: dst.name}, nil); err != nil {
			t.Fatalf("hop %d: %v", i+1, err)
		}
		got := map[string]int64{"host-a": ra.RoundTrips() - before[0], "host-b": rb.RoundTrips() - before[1]}
		t.Logf("hop %d %s->%s, %d VMs: registry round trips: source %d, destination %d", i+1, src.name, dst.name, len(vms), got[src.name], got[dst.name])
		if got[src.name] != 2 {
			t.Errorf("hop %d: the source made %d registry round trips, want 2 (Begin, Commit)", i+1, got[src.name])
		}
		for _, vm := range vms {
			f.checkSingleOwner(vm, dst.name)
		}
	}
}

// TestRegistryUnavailableAtBegin: without quorum the migration is refused
// before anything is sent (fail closed): exit code 6, the VM runs on the
// source with its key, the destination got nothing; once the registry is
// back the same migration goes through.
func TestRegistryUnavailableAtBegin(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	fk := f.useRegistry("fake")
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	vm := a.createVM("vm1")
	a.guestSeal(vm, []byte("s1"))
	var down atomic.Bool
	down.Store(true)
	fk.Fail = func(op, host string) error {
		if down.Load() {
			return registry.ErrNoQuorum
		}
		return nil
	}
	_, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil)
	if !errors.Is(err, migrate.ErrRegistryUnavailable) || !errors.Is(err, registry.ErrNoQuorum) || errclass.ExitCode(err) != 6 {
		t.Fatalf("migration without quorum: %v (exit %d), want ErrRegistryUnavailable, exit 6", err, errclass.ExitCode(err))
	}
	t.Logf("refused: %v", err)
	if methods := b.wire.methods(); len(methods) != 0 {
		t.Fatalf("the destination was contacted: %v", methods)
	}
	down.Store(false)
	f.checkSingleOwner(vm, "host-a")
	if got := a.guestUnseal(vm); string(got) != "s1" {
		t.Fatalf("unseal on A: %q", got)
	}
	if _, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil); err != nil {
		t.Fatalf("migration once the registry is back: %v", err)
	}
	f.checkSingleOwner(vm, "host-b")
}

// TestRegistryUnavailableAtCommit: the quorum goes after the hypervisor
// moved the VM: the commit is not known, the transaction stays open (exit
// 4), the VM runs on the destination with its PENDING key; Reconcile
// cannot finish while the registry is down, and finishes once it is back
// (the same Commit again), leaving one owner.
func TestRegistryUnavailableAtCommit(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	fk := f.useRegistry("fake")
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	vm := a.createVM("vm1")
	a.guestSeal(vm, []byte("s1"))
	var down atomic.Bool
	fk.Fail = func(op, host string) error {
		if down.Load() {
			return registry.ErrNoQuorum
		}
		return nil
	}
	a.hyp.BeforeMigrateCommit = func() error { down.Store(true); return nil }
	_, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil)
	a.hyp.BeforeMigrateCommit = nil
	if !errors.Is(err, migrate.ErrUnresolved) || !errors.Is(err, migrate.ErrRegistryUnavailable) || errclass.ExitCode(err) != 4 {
		t.Fatalf("commit without quorum: %v (exit %d), want unresolved (exit 4)", err, errclass.ExitCode(err))
	}
	if _, ok := b.node.Incoming(vm); !ok {
		t.Fatal("the destination does not hold the PENDING key")
	}
	if got := b.guestUnseal(vm); string(got) != "s1" {
		t.Fatalf("the VM on B lost its vTPM: %q", got)
	}
	if err := a.node.Reconcile(ctx); !errors.Is(err, migrate.ErrUnresolved) {
		t.Fatalf("reconcile without quorum: %v, want unresolved", err)
	}
	down.Store(false)
	for round := 0; round < 3; round++ {
		if err = errors.Join(a.node.Reconcile(ctx), b.node.Reconcile(ctx)); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	f.checkSingleOwner(vm, "host-b")
}

// TestRegistryRefusesHostStates: a draining or fenced destination, or one
// not enrolled, is refused by the registry's compare-and-swap (exit 2,
// the rule named) before anything is sent.
func TestRegistryRefusesHostStates(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	f.useRegistry("etcd")
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	vm := a.createVM("vm1")
	for _, tc := range []struct {
		state registry.HostState
		want  error
		rule  string
	}{
		{registry.StateDraining, registry.ErrHostNotActive, "rule host-active"},
		{registry.StateFenced, registry.ErrHostFenced, "rule host-fenced"},
	} {
		if err := f.op.SetState(ctx, "host-b", tc.state); err != nil {
			t.Fatal(err)
		}
		_, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil)
		if !errors.Is(err, migrate.ErrRegistryRefused) || !errors.Is(err, tc.want) || errclass.ExitCode(err) != 2 || !strings.Contains(err.Error(), tc.rule) {
			t.Fatalf("migration to a %s host: %v (exit %d)", tc.state, err, errclass.ExitCode(err))
		}
		t.Logf("%s: %v", tc.state, err)
		f.checkSingleOwner(vm, "host-a")
	}
	if methods := b.wire.methods(); len(methods) != 0 {
		t.Fatalf("the refused destination was contacted: %v", methods)
	}
	if err := f.op.SetState(ctx, "host-b", registry.StateActive); err != nil {
		t.Fatal(err)
	}
	if _, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil); err != nil {
		t.Fatal(err)
	}
	f.checkSingleOwner(vm, "host-b")
}

// TestStaleCopyRefusedAndCleaned: host-a's data directory is restored from
// before the VM moved to host-b (its old key file is back). The rollback
// anchor refuses it first; an operator accepts it anyway ('vtpmd anchor
// accept' without confirming the owners). Its start is then refused, naming the owner and the generation; the copy is kept while
// host-b cannot confirm, and shredded once host-b confirms over the wire
// that it holds the newer generation.
func TestStaleCopyRefusedAndCleaned(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	f.useRegistry("etcd")
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	vm := a.createVM("vm1")
	keyFile := filepath.Join(a.dir, "keys", vm+".key")
	old, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil); err != nil {
		t.Fatal(err)
	}
	f.checkSingleOwner(vm, "host-b")
	if err := os.WriteFile(keyFile, old, 0o600); err != nil { // the restore
		t.Fatal(err)
	}
	a.acceptAnchor()
	a.restart()
	b.down = true // host-b cannot confirm yet
	_, err = a.node.CheckStart(ctx, vm)
	if !errors.Is(err, migrate.ErrNotOwner) || !strings.Contains(err.Error(), "rule "+migrate.RuleStaleCopy) ||
		!strings.Contains(err.Error(), "host-b owning it at generation 2") {
		t.Fatalf("start of the stale copy: %v", err)
	}
	t.Logf("refused: %v", err)
	if _, err := a.node.DefineSecret(ctx, vm); !errors.Is(err, migrate.ErrNotOwner) {
		t.Fatalf("the hook's start path: %v", err)
	}
	rep, err := a.node.SyncOwnership(ctx)
	if err == nil || len(rep.Shredded) != 0 || rep.Stale[vm] == "" {
		t.Fatalf("sync while the owner is down: %+v %v, want the copy kept", rep, err)
	}
	if _, err := os.Stat(keyFile); err != nil {
		t.Fatalf("the stale copy went before the owner confirmed: %v", err)
	}
	b.down = false
	if rep, err = a.node.SyncOwnership(ctx); err != nil || len(rep.Shredded) != 1 {
		t.Fatalf("sync once the owner answers: %+v %v", rep, err)
	}
	f.checkSingleOwner(vm, "host-b")
	if n := a.audit.count("stale-copy-shredded"); n != 1 {
		t.Errorf("%d stale-copy-shredded audit events", n)
	}
}

// TestRegistryOlderIsRaised: the registry is restored from a snapshot
// older than the hosts: a VM it does not know, or knows at a lower
// generation, is raised to the generation the host holds (Bump, compared
// against the record read); the host may then start and migrate it.
func TestRegistryOlderIsRaised(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	f.useRegistry("fake")
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	vm := a.createVM("vm1")
	for _, hop := range [][2]*host{{a, b}, {b, a}} {
		if _, err := hop[0].node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: hop[1].name}, nil); err != nil {
			t.Fatal(err)
		}
	}
	f.checkSingleOwner(vm, "host-a") // generation 3
	restore := func(seed func(op *registrytest.FakeClient)) {
		fk := registrytest.NewFake()
		op := fk.Client("root")
		registrytest.Enroll(t, op, "host-a", "host-b")
		seed(op)
		f.op = op
		for _, h := range []*host{a, b} {
			f.regs[h.name] = fk.Client(h.name)
			h.restart()
		}
	}
	restore(func(*registrytest.FakeClient) {}) // from before the VM existed
	if gen, err := a.node.CheckStart(ctx, vm); err != nil || gen != 3 {
		t.Fatalf("start with an empty registry: %d %v", gen, err)
	}
	f.checkSingleOwner(vm, "host-a")
	restore(func(op *registrytest.FakeClient) { // from when host-b held generation 1
		if _, err := op.CreateVM(ctx, vm, "host-b"); err != nil {
			t.Fatal(err)
		}
	})
	if rep, err := b.node.SyncOwnership(ctx); err != nil || len(rep.Raised) != 0 {
		t.Fatalf("host-b, holding nothing, changed something: %+v %v", rep, err)
	}
	rep, err := a.node.SyncOwnership(ctx)
	if err != nil || len(rep.Raised) != 1 {
		t.Fatalf("sync on host-a: %+v %v", rep, err)
	}
	f.checkSingleOwner(vm, "host-a")
	if _, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil); err != nil {
		t.Fatalf("migration after the raise: %v", err)
	}
	f.checkSingleOwner(vm, "host-b")
}

// TestSyncAbortsOrphanTransaction: the registry shows a transaction open
// that this host's ledger does not hold (restored from before it ended,
// or an abort that did not reach the registry): the owner's sync aborts
// it, and so does a migration that finds one.
func TestSyncAbortsOrphanTransaction(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	f.useRegistry("etcd")
	a, _ := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	vm := a.createVM("vm1")
	orphan := func(id string) {
		b := registry.Batch{TxID: strings.Repeat(id, 16), From: "host-a", To: "host-b", VMs: []registry.VMGen{{ID: vm, Generation: 1}}}
		if _, err := f.regs["host-a"].Begin(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	orphan("0f")
	rep, err := a.node.SyncOwnership(ctx)
	if err != nil || len(rep.Aborted) != 1 {
		t.Fatalf("sync: %+v %v", rep, err)
	}
	f.checkSingleOwner(vm, "host-a")
	// A migration that finds one aborts it itself and goes through.
	orphan("1e")
	if _, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil); err != nil {
		t.Fatalf("migration with an orphan registry transaction: %v", err)
	}
	f.checkSingleOwner(vm, "host-b")
	// The same on host-b, the owner now.
	b := registry.Batch{TxID: strings.Repeat("2d", 16), From: "host-b", To: "host-a", VMs: []registry.VMGen{{ID: vm, Generation: 2}}}
	if _, err := f.regs["host-b"].Begin(ctx, b); err != nil {
		t.Fatal(err)
	}
	bh := f.hosts["host-b"]
	if _, err := bh.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-a"}, nil); err != nil {
		t.Fatalf("host-b's own orphan: %v", err)
	}
	f.checkSingleOwner(vm, "host-a")
}
