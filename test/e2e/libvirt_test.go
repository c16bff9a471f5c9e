//go:build e2e

package e2e_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/test/lab"
)

func passphrase() []byte {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return []byte(hex.EncodeToString(b))
}

// TestLibvirtSecretRules runs plain libvirt migrations (no vtpmm protocol)
// and checks the classification of libvirt's failures: a destination
// without the secret fails fast with ErrSecretMissing, one with another
// value fails late with ErrSecretMismatch, and the VM keeps running on the
// source both times; with the right secret it moves.
func TestLibvirtSecretRules(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	n := newNetwork(ctx, t)
	a := newHost(ctx, t, n, "host-a", "10.251.0.1")
	b := newHost(ctx, t, n, "host-b", "10.251.0.2")
	vm, pass := lab.NewUUID(), passphrase()
	startVM(ctx, t, a, vm, "plainvm", pass)
	onA := map[*lab.Host]hypervisor.State{a: hypervisor.StateRunning, b: hypervisor.StateAbsent}

	for _, tc := range []struct {
		name string
		opt  libvirt.MigrateOptions
	}{{"libvirt", libvirt.MigrateOptions{NoPrecheck: true}}, {"precheck", libvirt.MigrateOptions{}}} {
		t0 := time.Now()
		err := a.Hyp.MigrateWith(ctx, vm, b.Target(), tc.opt)
		t.Logf("%s: missing secret: %v after %v", tc.name, err, time.Since(t0).Round(time.Millisecond))
		if !errors.Is(err, hypervisor.ErrSecretMissing) {
			t.Fatalf("%s: missing secret: got %v, want ErrSecretMissing", tc.name, err)
		}
		wantState(ctx, t, vm, onA)
	}

	if err := b.Hyp.DefineSecret(ctx, vm, passphrase()); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	err := a.Hyp.MigrateWith(ctx, vm, b.Target(), libvirt.MigrateOptions{NoPrecheck: true})
	t.Logf("wrong secret: %v after %v", err, time.Since(t0).Round(time.Millisecond))
	if !errors.Is(err, hypervisor.ErrSecretMismatch) {
		t.Fatalf("wrong secret: got %v, want ErrSecretMismatch", err)
	}
	wantState(ctx, t, vm, onA)

	if err := b.Hyp.DefineSecret(ctx, vm, pass); err != nil {
		t.Fatal(err)
	}
	t0 = time.Now()
	if err := a.Hyp.Migrate(ctx, vm, b.Target()); err != nil {
		t.Fatal(err)
	}
	t.Logf("plain live migration A->B with the right secret: %v", time.Since(t0).Round(time.Millisecond))
	wantState(ctx, t, vm, map[*lab.Host]hypervisor.State{a: hypervisor.StateAbsent, b: hypervisor.StateRunning})
	if js, err := b.Hyp.CompletedJobStats(ctx, vm); err == nil {
		t.Logf("libvirt job on B: elapsed %v, downtime %v, %d bytes", js.Elapsed, js.Downtime, js.DataProcessed)
	}
	// libvirt leaves the source's secret: vtpmm's migration node owns it
	// and undefines it when the transaction commits (TestNodeMigrateABA).
	if has, err := a.Hyp.HasSecret(ctx, vm); err != nil || !has {
		t.Errorf("source secret after a plain libvirt migration: has=%v err=%v, want it left to its owner", has, err)
	}
	doms, err := b.Hyp.Domains(ctx)
	if err != nil || len(doms) != 1 || doms[0].UUID != vm {
		t.Errorf("Domains on B = %v, %v; want just %s", doms, err, vm)
	}
}
