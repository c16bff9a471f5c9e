package migrate_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// replaceTPM is the loss of h's TPM and its replacement: the host powers
// off (its VMs stop, libvirt forgets its secrets), and comes back on a new
// TPM with a new data directory (identity, vault, anchor, an empty key
// store and ledger), enrolled again; the hypervisor's domains and their
// vTPM states stay on its disk.
func (h *host) replaceTPM() {
	t, ctx := h.f.t, context.Background()
	t.Helper()
	if err := h.hyp.PowerCycle(ctx); err != nil {
		t.Fatal(err)
	}
	h.ledger.Close()
	h.ledger = nil
	if h.anchor != nil {
		h.anchor.Close()
		h.anchor = nil
	}
	h.vault.Close()
	tpmtest.CheckNoLeaks(t, h.meter)
	h.meter.Close()
	if err := h.emu.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	h.provision(bootLogOf(h), true)
	h.restart()
}

// TestReuniteAfterDestinationLostTPM (soak seed 6014): a plain migration
// with the hook moves a VM from host-a to host-b, where it runs on its
// PENDING key; host-b loses its TPM before host-a settles the
// transaction, and comes back on a new one with an empty ledger and key
// store. The VM's domain and its vTPM state (encrypted under the VM key)
// are on host-b's disk; the key only on host-a. host-a's recovery keeps
// the key (host-b never recorded the transaction, as far as it can tell
// now) and records the VM apart; Reunite then moves the key to host-b,
// attested and two-phase, where the VM starts and unseals its secret.
// Before the fix, recovery aborted and nothing ever brought key and
// domain together: no host could start the VM.
func TestReuniteAfterDestinationLostTPM(t *testing.T) {
	t.Parallel()
	for _, reg := range []string{"none", "etcd"} {
		t.Run(reg, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			f, a, b := twoHosts(t, reg)
			secret := []byte("sealed before the TPM died")
			vm := a.sealedVM("vm1", secret)
			f.hookMode()
			if err := a.hyp.Migrate(ctx, vm, b.hyp.Target()); err != nil {
				t.Fatalf("plain migration with the hook: %v", err)
			}
			b.replaceTPM()
			if d, _ := b.hyp.Domain(ctx, vm); d.State != hypervisor.StateShutoff {
				t.Fatalf("host-b's domain after the power cycle: %s", d.State)
			}

			if err := reconcileBoth(ctx, a, b); err != nil {
				t.Fatalf("not reconciled: %v", err)
			}
			aparts, err := a.ledger.Aparts()
			if err != nil || len(aparts) != 1 || aparts[0].VM != vm || aparts[0].Host != "host-b" {
				t.Fatalf("host-a's apart records: %+v, %v", aparts, err)
			}
			if _, _, err := a.keys.Get(ctx, vm); err != nil {
				t.Fatalf("host-a dropped the only key left: %v", err)
			}
			if _, err := b.node.CheckStart(ctx, vm); !errors.Is(err, migrate.ErrNotOwner) {
				t.Fatalf("host-b may start the VM without its key: %v", err)
			}

			moved, err := a.node.Reunite(ctx)
			if err != nil || len(moved) != 1 || moved[0] != vm {
				t.Fatalf("reunite: moved %v, %v", moved, err)
			}
			if aparts, _ := a.ledger.Aparts(); len(aparts) != 0 {
				t.Fatalf("records left after the move: %+v", aparts)
			}
			if _, err := b.node.DefineSecret(ctx, vm); err != nil {
				t.Fatalf("host-b may not start the VM whose key it now holds: %v", err)
			}
			if err := b.hyp.StartDomain(ctx, vm); err != nil {
				t.Fatal(err)
			}
			f.checkSingleOwner(vm, "host-b")
			if got := b.guestUnseal(vm); !bytes.Equal(got, secret) {
				t.Fatalf("unsealed %q", got)
			}
			if moved, err := a.node.Reunite(ctx); err != nil || len(moved) != 0 {
				t.Fatalf("a second round: moved %v, %v", moved, err)
			}
		})
	}
}

// TestReuniteRules: a key-only move never takes a key away from a domain
// defined on its host, nor to a host that does not hold the VM's domain;
// a record whose key left the host, or whose domain is back, is dropped.
func TestReuniteRules(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	vm := a.sealedVM("vm1", []byte("stays"))

	// The domain is defined here: refused before anything is opened.
	_, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b", KeyOnly: true}, nil)
	if !errors.Is(err, migrate.ErrDomainHere) {
		t.Fatalf("key-only move of a VM whose domain is here: %v, want ErrDomainHere", err)
	}
	if open, _ := a.ledger.OpenTxs(); len(open) != 0 {
		t.Fatalf("a refused key-only move left %+v", open)
	}
	// A record of a VM whose domain is here again is dropped, key kept.
	if err := a.ledger.MarkApart(migrate.Apart{VM: vm, Host: "host-b", Tx: strings.Repeat("ab", 16)}); err != nil {
		t.Fatal(err)
	}
	if moved, err := a.node.Reunite(ctx); err != nil || len(moved) != 0 {
		t.Fatalf("reunite with the domain here: moved %v, %v", moved, err)
	}
	if aparts, _ := a.ledger.Aparts(); len(aparts) != 0 {
		t.Fatalf("the record stays: %+v", aparts)
	}

	// The domain is on neither host: the key-only move aborts at the
	// destination (after its Prepare) and the key stays here.
	if err := a.hyp.DestroyDomain(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if err := a.hyp.UndefineDomain(ctx, vm); err != nil {
		t.Fatal(err)
	}
	_, err = a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b", KeyOnly: true}, nil)
	if !errors.Is(err, migrate.ErrNoDomain) {
		t.Fatalf("key-only move to a host without the domain: %v, want ErrNoDomain", err)
	}
	if _, _, err := a.keys.Get(ctx, vm); err != nil {
		t.Fatalf("the source lost its key: %v", err)
	}
	if _, _, err := b.keys.Get(ctx, vm); err == nil || len(b.pendingKeyFiles(vm)) > 0 {
		t.Fatalf("host-b kept a key of a VM whose domain it does not hold (%v, %v)", err, b.pendingKeyFiles(vm))
	}
	if ok, _ := b.hyp.HasSecret(ctx, vm); ok {
		t.Fatal("host-b kept the secret")
	}
	// Reunite waits (one Status, no move) while the domain is not there.
	if err := a.ledger.MarkApart(migrate.Apart{VM: vm, Host: "host-b", Tx: strings.Repeat("cd", 16)}); err != nil {
		t.Fatal(err)
	}
	if moved, err := a.node.Reunite(ctx); !errors.Is(err, migrate.ErrNoDomain) || len(moved) != 0 {
		t.Fatalf("reunite without the domain there: moved %v, %v", moved, err)
	}
	if aparts, _ := a.ledger.Aparts(); len(aparts) != 1 {
		t.Fatalf("the record was dropped: %+v", aparts)
	}
	// The key left (restored elsewhere, shredded): the record goes.
	if err := a.keys.Delete(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if moved, err := a.node.Reunite(ctx); err != nil || len(moved) != 0 {
		t.Fatalf("reunite without the key: moved %v, %v", moved, err)
	}
	if aparts, _ := a.ledger.Aparts(); len(aparts) != 0 {
		t.Fatalf("the record stays: %+v", aparts)
	}
}
