package migrate_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/fake"
	"github.com/vtpmm/vtpmm/migrate"
)

var _ migrate.MigrationJobs = (*fake.Host)(nil)

// hookMode wires each host's fake hypervisor like vtpmctl's libvirt hook:
// an incoming migration begins with RequestPull to every other host; a
// released domain is settled.
func (f *fleet) hookMode() {
	for name, h := range f.hosts {
		var peers []string
		for other := range f.hosts {
			if other != name {
				peers = append(peers, other)
			}
		}
		h.hyp.MigrateBegin = func(ctx context.Context, vm, _ string) error {
			_, err := h.node.RequestPull(ctx, []string{vm}, peers)
			return err
		}
		h.hyp.PrepareBegin = func(ctx context.Context, vm, _ string) error { return h.prepareBegin(ctx, vm) }
	}
}

// prepareBegin is vtpmd's "prepare begin" hook (cmd/vtpmd/daemon/hook.go):
// an incoming migration's PENDING key is admitted by AdmitIncoming only;
// anything else is a start, through the start rule (DefineSecret).
func (h *host) prepareBegin(ctx context.Context, vm string) error {
	if _, ok, err := h.node.AdmitIncoming(ctx, vm); ok || err != nil {
		return err
	}
	_, err := h.node.DefineSecret(ctx, vm)
	return err
}

// TestHookModePlainMigration: a migration the hypervisor starts by itself
// (a plain "virsh migrate") moves the key: the destination pulls it at
// "migrate begin", the source settles after the release, and the guest's
// sealed secret unseals on the destination. An untrusted destination is
// refused by its own hook before anything is copied, naming the rule.
func TestHookModePlainMigration(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f, hs := hookFleet(t, 0, "host-a", "host-b", "host-c")
	a, b, c := hs[0], hs[1], hs[2]
	secret := []byte("sealed before a plain migration")
	vm := a.sealedVM("vm1", secret)

	// A Pull without a migration in progress is refused: keys leave only
	// for a migration the owner's hypervisor runs.
	_, err := b.node.RequestPull(ctx, []string{vm}, []string{"host-a", "host-c"})
	if !errors.Is(err, migrate.ErrNotMigrating) {
		t.Fatalf("pull without a migration job: got %v, want ErrNotMigrating", err)
	}
	if ok, _ := b.hyp.HasSecret(ctx, vm); ok {
		t.Fatal("a refused pull defined a secret on the destination")
	}

	if err := a.hyp.Migrate(ctx, vm, b.hyp.Target()); err != nil {
		t.Fatalf("plain migration with the hook: %v", err)
	}
	// Before settling, the source's transaction is open and leased, and
	// confirmed: the destination's start gate asked the source before it
	// ran the VM on its PENDING key.
	if open, _ := a.ledger.OpenTxs(); len(open) != 1 || !open[0].Pulled || open[0].State != migrate.SrcPrepared || !open[0].Confirmed {
		t.Fatalf("source ledger after the hypervisor's migration: %+v", open)
	}
	a.settleMoved(ctx, vm, b, secret)

	// Untrusted destination: its hook fails the migration with the rule.
	err = b.hyp.Migrate(ctx, vm, c.hyp.Target())
	if !errors.Is(err, hypervisor.ErrHookRefused) {
		t.Fatalf("migration to untrusted C: got %v, want ErrHookRefused", err)
	}
	if !errors.Is(err, migrate.ErrRefused) || !strings.Contains(err.Error(), string(attest.RulePCRPolicy)) {
		t.Fatalf("refusal does not name the rule: %v", err)
	}
	t.Logf("refusal as the hypervisor reports it: %v", err)
	if ok, _ := c.hyp.HasSecret(ctx, vm); ok {
		t.Fatal("untrusted C got a secret")
	}
	if _, _, err := c.keys.Get(ctx, vm); err == nil {
		t.Fatal("untrusted C holds a key")
	}
	f.checkSingleOwner(vm, "host-b")
	if got := b.guestUnseal(vm); !bytes.Equal(got, secret) {
		t.Fatalf("guest secret on B after the refusal: %q", got)
	}
	for _, h := range []*host{a, b, c} {
		h.audit.verify(t)
	}
}

// TestHookModeFailedMigrationAborts: the hypervisor's migration fails after
// the pull (late, as a libvirt failure after the memory copy). The VM keeps
// running on the source with its key; once no migration job is left and
// the lease is over, Reconcile aborts the pulled transaction and the
// destination drops its PENDING key and secret. While the job runs,
// Reconcile leaves the transaction alone.
func TestHookModeFailedMigrationAborts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f, hs := hookFleet(t, time.Nanosecond, "host-a", "host-b")
	a, b := hs[0], hs[1]
	secret := []byte("survives a failed plain migration")
	vm := a.sealedVM("vm1", secret)
	var during error
	a.hyp.BeforeMigrateCommit = func() error {
		during = a.node.Reconcile(ctx) // the job runs: must not abort
		if open, _ := a.ledger.OpenTxs(); len(open) != 1 {
			t.Errorf("reconcile during the hypervisor's job closed the pulled transaction: %+v", open)
		}
		return errors.New("injected late failure")
	}
	if err := a.hyp.Migrate(ctx, vm, b.hyp.Target()); err == nil {
		t.Fatal("migration succeeded despite the injected failure")
	}
	if during != nil {
		t.Fatalf("reconcile during the job: %v", during)
	}
	if err := a.node.Reconcile(ctx); err != nil {
		t.Fatalf("reconcile after the failure: %v", err)
	}
	f.checkSingleOwner(vm, "host-a")
	if ok, _ := b.hyp.HasSecret(ctx, vm); ok {
		t.Fatal("the destination kept the secret of an aborted pull")
	}
	if got := a.guestUnseal(vm); !bytes.Equal(got, secret) {
		t.Fatalf("guest secret on A: %q", got)
	}
	// The next plain migration works.
	a.hyp.BeforeMigrateCommit = nil
	if err := a.hyp.Migrate(ctx, vm, b.hyp.Target()); err != nil {
		t.Fatal(err)
	}
	if err := a.node.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	f.checkSingleOwner(vm, "host-b")
}

// TestHookModeWithVtpmmMigration: with the hook installed, a migration
// vtpmm drives (Node.Migrate) still works: the destination's hook finds
// the key already PENDING and pulls nothing; it only asks the source to
// confirm the job, at "migrate begin" and at "prepare begin" (Pull with
// the transaction), and the source opens no second transaction.
func TestHookModeWithVtpmmMigration(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f, hs := hookFleet(t, 0, "host-a", "host-b")
	a := hs[0]
	vm := a.createVM("vm1")
	if _, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil); err != nil {
		t.Fatal(err)
	}
	f.checkSingleOwner(vm, "host-b")
	if n := strings.Count(strings.Join(a.wire.methods(), " "), "Pull-response"); n != 2 {
		t.Fatalf("the source confirmed %d Pulls during a vtpmm-driven migration, want 2 (migrate begin, prepare begin)", n)
	}
	if all, _ := a.ledger.All(); len(all) != 1 {
		t.Fatalf("the source's ledger holds %d transactions, want the one Migrate opened: %+v", len(all), all)
	}
}

func TestDecodePull(t *testing.T) {
	t.Parallel()
	const vm = "6f1c3a52-0c41-4d1c-9d55-3f1e7c2b9a10"
	tests := []struct {
		name, in string
		ok       bool
	}{
		{"valid", `{"version":1,"dest":"host-b","vms":["` + vm + `"]}`, true},
		{"old version", `{"version":0,"dest":"host-b","vms":["` + vm + `"]}`, false},
		{"bad host", `{"version":1,"dest":"-x","vms":["` + vm + `"]}`, false},
		{"no VM", `{"version":1,"dest":"host-b","vms":[]}`, false},
		{"repeated VM", `{"version":1,"dest":"host-b","vms":["` + vm + `","` + vm + `"]}`, false},
		{"bad uuid", `{"version":1,"dest":"host-b","vms":["../etc"]}`, false},
		{"confirmation", `{"version":1,"dest":"host-b","vms":["` + vm + `"],"tx":"0123456789abcdef0123456789abcdef"}`, true},
		{"bad transaction id", `{"version":1,"dest":"host-b","vms":["` + vm + `"],"tx":"../x"}`, false},
		{"unknown field", `{"version":1,"dest":"host-b","vms":["` + vm + `"],"x":1}`, false},
		{"trailing", `{"version":1,"dest":"host-b","vms":["` + vm + `"]} {}`, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := migrate.DecodePull([]byte(tc.in))
			if (err == nil) != tc.ok {
				t.Fatalf("DecodePull(%s) = %v", tc.in, err)
			}
			if err != nil && !errors.Is(err, migrate.ErrBadMessage) {
				t.Fatalf("not ErrBadMessage: %v", err)
			}
		})
	}
}

// TestPullBoundToTheJob is issue 10's attack 4: while A's hypervisor
// migrates a VM to D (hook mode: D pulled the key), enrolled host B pulls
// the same VM. The honest twin first (a plain migration to D and back).
// Then B's pull is refused and D's pulled transaction is undisturbed: the
// migration to D completes. Twice: with a hypervisor that names the job's
// destination (the fake: B is not the destination, ErrNotMigrating) and
// with one that cannot (as libvirt: the job started before D's pull, so it
// is D's, ErrBusy). Last, a pull whose job ended elsewhere: B's pulled key
// is dropped and its secret undefined when A's next job goes to D.
func TestPullBoundToTheJob(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f, hs := hookFleet(t, 0, "host-a", "host-b", "host-d")
	a, b, d := hs[0], hs[1], hs[2]
	secret := []byte("one destination per job")
	vm := a.sealedVM("vm1", secret)
	plain := func(from, to *host) {
		t.Helper()
		if err := from.hyp.Migrate(ctx, vm, to.hyp.Target()); err != nil {
			t.Fatalf("plain migration %s -> %s: %v", from.name, to.name, err)
		}
		if err := from.node.Settle(ctx, vm); err != nil {
			t.Fatalf("settle on %s: %v", from.name, err)
		}
		f.checkSingleOwner(vm, to.name)
	}
	plain(a, d)
	plain(d, a)

	// B pulls right after D's pull, while the VM still runs on A.
	dPull := d.hyp.MigrateBegin
	for _, destKnown := range []bool{true, false} {
		a.hyp.JobDestUnknown = !destKnown
		var pullErr error
		d.hyp.MigrateBegin = func(ctx context.Context, id, name string) error {
			if err := dPull(ctx, id, name); err != nil {
				return err
			}
			_, pullErr = b.node.RequestPull(ctx, []string{vm}, []string{"host-a", "host-d"})
			return nil
		}
		plain(a, d)
		d.hyp.MigrateBegin = dPull
		want := migrate.ErrNotMigrating
		if !destKnown {
			want = migrate.ErrBusy
		}
		if !errors.Is(pullErr, want) {
			t.Fatalf("destination known %v: B's pull during A's job to D: %v, want %v", destKnown, pullErr, want)
		}
		t.Logf("destination known %v: B's pull refused: %v", destKnown, pullErr)
		if has, _ := b.hyp.HasSecret(ctx, vm); has || len(b.pendingKeyFiles(vm)) > 0 {
			t.Fatalf("B holds a secret (%v) or a pending key after its refused pull", has)
		}
		plain(d, a)
		if got := a.guestUnseal(vm); !bytes.Equal(got, secret) {
			t.Fatalf("guest secret on A: %q", got)
		}
	}

	// B pulls for a job to B that fails late; the VM stays on A and B's
	// pulled key waits (leased). A's next job goes to D: D's pull settles
	// B's transaction, so B drops its key and secret.
	a.hyp.JobDestUnknown = false
	a.hyp.BeforeMigrateCommit = func() error { return errors.New("injected late failure") }
	if err := a.hyp.Migrate(ctx, vm, b.hyp.Target()); err == nil {
		t.Fatal("the failing migration to B succeeded")
	}
	a.hyp.BeforeMigrateCommit = nil
	if has, _ := b.hyp.HasSecret(ctx, vm); !has || len(b.pendingKeyFiles(vm)) != 1 {
		t.Fatalf("B should hold the pulled key while the pull is leased (secret %v, files %v)", has, b.pendingKeyFiles(vm))
	}
	plain(a, d)
	if has, _ := b.hyp.HasSecret(ctx, vm); has || len(b.pendingKeyFiles(vm)) > 0 {
		t.Fatalf("B kept the pulled key or its secret after the job ended elsewhere (secret %v)", has)
	}
	if _, ok := b.node.Incoming(vm); ok {
		t.Fatal("B's pulled transaction is still open")
	}
}
