package migrate_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/migrate"
)

// afterHypervisor are the crash points at which the VM already runs on
// the destination.
var afterHypervisor = map[migrate.CrashPoint]bool{
	migrate.SrcAfterHypervisor: true, migrate.SrcAfterMigrated: true,
	migrate.SrcAfterFinish: true, migrate.DstAfterCommit: true, migrate.SrcAfterRegCommit: true,
}

// TestCrashAtEveryPoint kills one agent at each named crash point in turn,
// restarts it, lets both agents reconcile, and checks G3/G4: exactly one
// host runs the VM and holds its key, the key opens (the guest unseals what
// it sealed), no PENDING key or open transaction is left, and both audit
// chains verify.
func TestCrashAtEveryPoint(t *testing.T) {
	t.Parallel()
	crashSeries(t, newFleet(t))
}

// TestCrashAtEveryPointRegistry is TestCrashAtEveryPoint with the fleet
// registry (a real etcd): the registry's steps are crash points too, and
// after each recovery the registry shows the single owner at the
// generation of its key with no transaction open.
func TestCrashAtEveryPointRegistry(t *testing.T) {
	t.Parallel()
	f := newFleet(t)
	f.useRegistry("etcd")
	crashSeries(t, f)
}

func crashSeries(t *testing.T, f *fleet) {
	ctx := context.Background()
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	vm := a.createVM("vm1")
	secret := []byte("sealed before any crash")
	a.guestSeal(vm, secret)
	owner, other := a, b
	for _, p := range migrate.CrashPoints {
		if p.RegistryOnly() && f.regs == nil {
			continue
		}
		t.Run(string(p), func(t *testing.T) {
			victim := owner
			if strings.HasPrefix(string(p), "dst/") {
				victim = other
			}
			f.setCrash(victim.name, p)
			_, err := owner.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: other.name}, nil)
			f.setCrash(victim.name, "")
			if err == nil {
				t.Fatalf("migration survived a crash at %s", p)
			}
			t.Logf("crash at %s on %s: %v", p, victim.name, err)
			victim.restart()

			var rerr error
			for round := 0; round < 3; round++ {
				rerr = errors.Join(owner.node.Reconcile(ctx), other.node.Reconcile(ctx))
				if rerr == nil {
					break
				}
				t.Logf("reconcile round %d: %v", round, rerr)
			}
			if rerr != nil {
				t.Fatalf("not reconciled after 3 rounds: %v", rerr)
			}
			want := owner
			if afterHypervisor[p] {
				want = other
			}
			f.checkSingleOwner(vm, want.name)
			// The anchor's steps, before and after each crash point, leave
			// both data directories in agreement with their TPMs.
			a.checkAnchor()
			b.checkAnchor()
			if got := want.guestUnseal(vm); !bytes.Equal(got, secret) {
				t.Fatalf("unsealed %q on %s", got, want.name)
			}
			t.Logf("VM on %s; audit records: %s %d, %s %d", want.name, a.name, a.audit.verify(t), b.name, b.audit.verify(t))
			if want != owner {
				owner, other = other, owner
			}
		})
	}
	// After all that, a normal migration still works.
	if _, err := owner.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: other.name}, nil); err != nil {
		t.Fatalf("migration after the crash series: %v", err)
	}
	f.checkSingleOwner(vm, other.name)
}
