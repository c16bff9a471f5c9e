package migrate_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/vtpmm/vtpmm/migrate"
)

// TestRecoverSourceVMRunsNowhere (soak seed 40, failover schedules): the
// source dies before anything reached the destination, and its VM dies
// with it (a fence agent powered the host off). Back up, the source's
// recovery finds the VM running nowhere and a destination that never
// recorded the transaction: it aborts (the registry's transaction too),
// keeps the key, and the owner may start the VM again. Before the fix the
// transaction stayed unresolved for ever and no host could start the VM.
// At src/after-prepare (soak seed 5003) the destination recorded the
// transaction and holds the key PENDING, but the source never released it
// (src-begun): the source aborts too. At src/after-prepared it released
// the key but never confirmed the migration to the destination's start
// gate, so the VM never ran there: it aborts too. Before those fixes the
// source waited for the destination and the destination for the source.
func TestRecoverSourceVMRunsNowhere(t *testing.T) {
	t.Parallel()
	for _, reg := range []string{"none", "etcd"} {
		for _, p := range []migrate.CrashPoint{migrate.SrcAfterBegin, migrate.SrcAfterRegBegin, migrate.SrcAfterAttest, migrate.SrcAfterPrepare, migrate.SrcAfterPrepared} {
			if p.RegistryOnly() && reg == "none" {
				continue
			}
			t.Run(fmt.Sprintf("%s/%s", reg, p), func(t *testing.T) {
				t.Parallel()
				ctx := context.Background()
				f, a, b, vm := crashedThenPoweredOff(t, reg, p, nil)
				if err := reconcileBoth(ctx, a, b); err != nil {
					t.Fatalf("not reconciled: %v", err)
				}
				if _, err := b.node.CheckStart(ctx, vm); !errors.Is(err, migrate.ErrNotOwner) {
					t.Fatalf("host-b may start the VM: %v", err)
				}
				if _, err := a.node.CheckStart(ctx, vm); err != nil {
					t.Fatalf("the owner may not start its VM after recovery: %v", err)
				}
				if err := a.hyp.StartDomain(ctx, vm); err != nil {
					t.Fatal(err)
				}
				f.checkSingleOwner(vm, "host-a")
				if got := a.guestUnseal(vm); string(got) != "sealed before the power-off" {
					t.Fatalf("unsealed %q", got)
				}
			})
		}
	}
}

// TestRecoverSourceVMMovedThenPoweredOff (soak seed 4001): the hypervisor
// migrated the VM (its domain is gone from the source), the source died
// before it recorded that, and the destination was powered off with the
// VM. The source's recovery must not abort (it would keep a key without
// the VM's domain or state, and no host could start it): the destination
// recorded the transaction, so it commits; the destination promotes its
// key and starts the VM, which unseals its secret.
func TestRecoverSourceVMMovedThenPoweredOff(t *testing.T) {
	t.Parallel()
	for _, reg := range []string{"none", "etcd"} {
		t.Run(reg, func(t *testing.T) {
			t.Parallel()
			movedThenPoweredOff(t, reg)
		})
	}
}

func movedThenPoweredOff(t *testing.T, reg string) {
	ctx := context.Background()
	f, a, b := twoHosts(t, reg)
	secret := []byte("sealed before the move")
	vm := a.sealedVM("vm1", secret)
	a.migrateCrashing(ctx, vm, "host-b", migrate.SrcAfterHypervisor)
	if err := b.hyp.DestroyDomain(ctx, vm); err != nil { // host-b's power-off
		t.Fatal(err)
	}
	a.restart()
	var err error
	for round := 0; round < 3; round++ {
		if err = errors.Join(a.node.Reconcile(ctx), b.node.Reconcile(ctx)); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("not reconciled: %v", err)
	}
	if _, err := a.node.CheckStart(ctx, vm); !errors.Is(err, migrate.ErrNotOwner) {
		t.Fatalf("host-a, which the VM left, may start it: %v", err)
	}
	if _, err := b.node.DefineSecret(ctx, vm); err != nil {
		t.Fatalf("the destination may not start the VM it holds: %v", err)
	}
	if err := b.hyp.StartDomain(ctx, vm); err != nil {
		t.Fatal(err)
	}
	f.checkSingleOwner(vm, "host-b")
	if got := b.guestUnseal(vm); string(got) != string(secret) {
		t.Fatalf("unsealed %q", got)
	}
}

// TestRecoverSourceConfirmedWaits is the other side of the src-prepared
// rule above: once the source confirmed the migration to the destination
// (its start gate may have run the VM on the PENDING key), a VM that runs
// nowhere may have died there with newer vTPM state. The source does not
// abort on the destination's word that it does not run there: it waits,
// and the owner may not start the VM from its older copy.
func TestRecoverSourceConfirmedWaits(t *testing.T) {
	t.Parallel()
	for _, reg := range []string{"none", "etcd"} {
		t.Run(reg, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			var txID string
			_, a, b, vm := crashedThenPoweredOff(t, reg, migrate.SrcAfterPrepared, func(a *host, vm string) {
				var err error
				if txID, err = a.ledger.Holder(vm); err != nil {
					t.Fatal(err)
				}
				// What confirmPull records before it answers the
				// destination (TestHookModePlainMigration checks that it
				// does).
				if _, err := a.ledger.Update(txID, func(tx *migrate.Tx) error { tx.Confirmed = true; return nil }); err != nil {
					t.Fatal(err)
				}
			})
			err := reconcileBoth(ctx, a, b)
			if !errors.Is(err, migrate.ErrUnresolved) {
				t.Fatalf("recovery of a confirmed transaction whose VM runs nowhere: %v, want it to wait (ErrUnresolved)", err)
			}
			if tx, err := a.ledger.Get(txID); err != nil || tx.State.Final() {
				t.Fatalf("the source closed the confirmed transaction: %+v, %v", tx, err)
			}
			if _, err := a.node.CheckStart(ctx, vm); !errors.Is(err, migrate.ErrNotOwner) {
				t.Fatalf("the source may start its older copy: %v", err)
			}
		})
	}
}

// crashedThenPoweredOff seals a secret in a VM on host-a, migrates it to
// host-b with host-a's vtpmd crashing at p, runs whileDown (if set) while
// that vtpmd is down, powers the VM off (the host's power-off, or its
// fence) and starts host-a's vtpmd again.
func crashedThenPoweredOff(t *testing.T, reg string, p migrate.CrashPoint, whileDown func(a *host, vm string)) (*fleet, *host, *host, string) {
	t.Helper()
	ctx := context.Background()
	f, a, b := twoHosts(t, reg)
	vm := a.sealedVM("vm1", []byte("sealed before the power-off"))
	a.migrateCrashing(ctx, vm, "host-b", p)
	if whileDown != nil {
		whileDown(a, vm)
	}
	if err := a.hyp.DestroyDomain(ctx, vm); err != nil {
		t.Fatal(err)
	}
	a.restart()
	return f, a, b, vm
}

// reconcileBoth runs recovery on both hosts, up to 3 rounds, until both
// settle; it returns the last round's errors.
func reconcileBoth(ctx context.Context, a, b *host) error {
	var err error
	for range 3 {
		if err = errors.Join(a.node.Reconcile(ctx), b.node.Reconcile(ctx)); err == nil {
			return nil
		}
	}
	return err
}
