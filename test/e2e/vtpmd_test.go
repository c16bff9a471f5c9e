//go:build e2e

package e2e_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/test/lab"
)

// TestVtpmdMigrateLinuxGuestABA: a Linux guest (TCG, TPM 2.0) seals a
// secret in its vTPM on host-a; the real vtpmd daemons move it
// A->B->A through 'vtpmctl migrate'. After each hop the guest keeps
// unsealing the same secret with PCR 16 unchanged on the new host (no
// reboot: its tick counter continues), exactly one host owns the key and
// runs the VM, and the generation went up by one.
func TestVtpmdMigrateLinuxGuestABA(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	img := guestImage(ctx, t)
	f := newVFleet(ctx, t, hostA(), hostB())
	a, b := f.Hosts["host-a"], f.Hosts["host-b"]
	vm := f.CreateVM(ctx, a, "linux-1", lab.LinuxSpec(img))
	f.Start(ctx)
	t0 := time.Now()
	ticks := f.WaitTicks(ctx, vm, a.Name, 0, 2, 3*time.Minute)
	t.Logf("guest sealed its secret and unsealed it %d times after %v", ticks, time.Since(t0).Round(time.Millisecond))
	secret := f.VerifyConsole(vm, 2)

	gen := 1
	for i, hop := range []struct{ src, dst *lab.FleetHost }{{a, b}, {b, a}} {
		_, per := f.Console(vm)
		before := len(per[hop.dst.Name].Ticks)
		lastN := lab.LastTick(per[hop.src.Name])
		f.Migrate(ctx, vm, hop.src, hop.dst)
		f.WaitTicks(ctx, vm, hop.dst.Name, before, 3, time.Minute)
		if s := f.VerifyConsole(vm, 2); s != secret {
			t.Fatalf("hop %d: secret %s, sealed %s", i+1, s, secret)
		}
		_, per = f.Console(vm)
		if first := per[hop.dst.Name].Ticks[before].N; first <= lastN {
			t.Errorf("hop %d: first tick on %s is %d, last on %s was %d: the guest restarted", i+1, hop.dst.Name, first, hop.src.Name, lastN)
		}
		owner, report, err := f.Owner(ctx, vm)
		if err != nil || owner != hop.dst.Name {
			t.Fatalf("hop %d: owner %q, %v\n%s", i+1, owner, err, report)
		}
		gen++
		rows, _, _ := f.VMList(ctx, hop.dst)
		if g := rows[vm.UUID].Gen; g != fmt.Sprint(gen) {
			t.Errorf("hop %d: generation %s on %s, want %d", i+1, g, hop.dst.Name, gen)
		}
	}
	_, per := f.Console(vm)
	t.Logf("guest unsealed its secret %d times on host-a and %d on host-b", len(per["host-a"].Ticks), len(per["host-b"].Ticks))
}

// TestVtpmdMigrateTPM12 moves a firmware-only VM with a TPM 1.2 vTPM
// (tpm-tis) A->B through 'vtpmctl migrate'.
func TestVtpmdMigrateTPM12(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	f := newVFleet(ctx, t, hostA(), hostB())
	a, b := f.Hosts["host-a"], f.Hosts["host-b"]
	vm := f.CreateVM(ctx, a, "tpm12-1", libvirt.VMSpec{TCG: !lab.KVM(), TPMVersion: "1.2"})
	f.Start(ctx)
	f.Migrate(ctx, vm, a, b)
	owner, report, err := f.Owner(ctx, vm)
	if err != nil || owner != b.Name {
		t.Fatalf("owner %q, %v\n%s", owner, err, report)
	}
	// libvirt ran a TPM 1.2 swtpm on the destination (state in swtpm/U/tpm1.2).
	if ents, err := os.ReadDir(b.Path(filepath.Join("/var/lib/libvirt/swtpm", vm.UUID, "tpm1.2"))); err != nil || len(ents) == 0 {
		t.Errorf("TPM 1.2 state on host-b: %d files, %v", len(ents), err)
	}
}

// TestVtpmdRecoveryTickDuringMigration starts a migration so that the
// source vtpmd's recovery loop (every 15 s while a transaction is open)
// ticks during libvirt's live migration. It must not touch the
// transaction the daemon itself is driving. Before the fix (Node.drive),
// Reconcile saw the VM still running on the source, aborted, and libvirt
// then completed the migration: the VM ran on the destination while the
// source kept its key. The unit test TestReconcileDuringOwnMigration
// covers the same in package migrate.
func TestVtpmdRecoveryTickDuringMigration(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	img := guestImage(ctx, t)
	f := newVFleet(ctx, t, hostA(), hostB())
	a, b := f.Hosts["host-a"], f.Hosts["host-b"]
	vm := f.CreateVM(ctx, a, "linux-t", lab.LinuxSpec(img))
	f.Start(ctx)
	f.WaitTicks(ctx, vm, a.Name, 0, 2, 3*time.Minute)
	// Start 300 ms before the source's next tick: the tick then lands in
	// the hypervisor phase (libvirt needs about 2 s for this guest).
	tick := a.Vtpmd.NextRecoveryTick(time.Now().Add(time.Second))
	time.Sleep(time.Until(tick.Add(-300 * time.Millisecond)))
	r, err := a.Vtpmd.Ctl(ctx, "migrate", vm.Name, "--to", b.Name)
	t.Logf("vtpmctl migrate with a recovery tick inside: %v %s", err, r)
	owner, report, oerr := f.Owner(ctx, vm)
	if err != nil || r.Code != 0 || oerr != nil || owner != b.Name {
		t.Fatalf("migration across a recovery tick: exit %d, owner %q (%v)\n%s", r.Code, owner, oerr, report)
	}
}
