package inproc_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/recovery"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// lostVM is a VM whose owner died with its TPM, with its bundle.
type lostVM struct {
	vm     fleet.VM
	bundle []byte
	secret string
}

// loseOwner creates a VM on owner, backs it up, and destroys owner with its
// TPM (inproc.Host.LoseTPM); with a registry, it retires owner.
func loseOwner(ctx context.Context, t *testing.T, f *inproc.Fleet, owner, name string) lostVM {
	t.Helper()
	h := f.InProcHost(owner)
	vm, err := f.CreateVM(ctx, owner, name)
	if err != nil {
		t.Fatal(err)
	}
	secret, err := h.TenantSecret(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	bundle := backupBundle(ctx, t, h, vm)
	if err := h.LoseTPM(ctx); err != nil {
		t.Fatal(err)
	}
	if op := f.Operator(); op != nil {
		retireHost(ctx, t, op, owner)
	}
	return lostVM{vm: vm, bundle: bundle, secret: secret}
}

// backupBundle backs vm up on h and returns its one bundle.
func backupBundle(ctx context.Context, t *testing.T, h *inproc.Host, vm fleet.VM) []byte {
	t.Helper()
	rep, err := h.Admin().Backup(ctx, adminapi.BackupRequest{VMs: []string{vm.UUID}})
	if err != nil || rep.Failed() != 0 || len(rep.Items) != 1 {
		t.Fatalf("backup of %s on %s: %+v, %v", vm.Name, h.Name(), rep, err)
	}
	bundle, err := os.ReadFile(rep.Items[0].Path)
	if err != nil {
		t.Fatal(err)
	}
	return bundle
}

// retireHost retires a dead host (vtpmctl host retire) once its lease is
// gone, within 30 s.
func retireHost(ctx context.Context, t *testing.T, op *registry.Client, host string) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(250 * time.Millisecond) {
		_, err := recovery.Retire(ctx, op, host, false)
		if err == nil {
			return
		}
		if !errors.Is(err, registry.ErrHostLive) || time.Now().After(deadline) {
			t.Fatalf("retire %s: %v", host, err)
		}
	}
}

// startRestored defines and starts the restored VM on h and checks that
// the tenant's secret unseals there.
func startRestored(ctx context.Context, t *testing.T, h *inproc.Host, l lostVM) {
	t.Helper()
	if err := h.Fake().DefineVTPMDomain(ctx, hypervisor.Domain{UUID: l.vm.UUID, Name: l.vm.Name}, h.Daemon().Host().Layout().VMState(l.vm.UUID)); err != nil {
		t.Fatal(err)
	}
	if err := h.Fake().StartDomain(ctx, l.vm.UUID); err != nil {
		t.Fatal(err)
	}
	if s, err := h.TenantSecret(ctx, l.vm); err != nil || s != l.secret {
		t.Fatalf("the tenant's secret after the restore: %q, %v; want %q", s, err, l.secret)
	}
}

// TestRestoreResumesInterrupted (issue 14): a 'vtpmctl restore' killed half
// way leaves the registry's restore transaction open (after its Begin; and
// after the destination prepared the key). The next restore of the VM
// recognises the transaction as an earlier restore's, closes it (the
// registry's Abort, then the destination drops what it staged) and
// restores; before, it was refused as busy until an operator aborted the
// transaction by hand. The VM ends owned by host-a alone at generation 2,
// nothing pending, and the tenant's secret unseals.
func TestRestoreResumesInterrupted(t *testing.T) {
	t.Parallel()
	c := newCustodians(t)
	f := escrowFleet(t, c, t.TempDir(), "", inproc.Config{Hosts: []inproc.HostSpec{{Name: fleet.HostA}, {Name: fleet.HostB}, {Name: hostD}}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	a := f.InProcHost(fleet.HostA)
	op := f.Operator()
	two := c.identities(t, "alice", "carol")
	lost := loseOwner(ctx, t, f, fleet.HostB, "db")
	restore := func(point string) (recovery.Report, error) {
		r := &recovery.Restorer{Admin: a.Admin(), Registry: op, Crash: func(p string) error {
			if p == point {
				return fmt.Errorf("vtpmctl killed at %s (test)", p)
			}
			return nil
		}}
		return r.Restore(ctx, recovery.Request{Bundle: lost.bundle, Identities: two, VM: lost.vm.UUID, Dest: fleet.HostA})
	}
	openTx := func(what string) string {
		t.Helper()
		v, err := op.VMs(ctx, lost.vm.UUID)
		rec := v.VMs[lost.vm.UUID]
		if err != nil || rec.Tx == nil || rec.Tx.To != fleet.HostA || rec.Owner != fleet.HostB || rec.Generation != 1 {
			t.Fatalf("%s: the registry shows %+v (%v), want the restore to host-a open at generation 1", what, rec, err)
		}
		return rec.Tx.ID
	}
	var last string
	for _, point := range []string{recovery.CrashAfterBegin, recovery.CrashAfterPrepare} {
		rep, err := restore(point)
		if err == nil {
			t.Fatalf("the restore killed at %s succeeded", point)
		}
		tx := openTx("killed at " + point)
		if last != "" && rep.Closed != last {
			t.Errorf("the restore after one killed at the previous point closed %q, want %s", rep.Closed, last)
		}
		t.Logf("killed at %s: transaction %s left open (closed before: %q)", point, tx, rep.Closed)
		last = tx
	}
	info, err := a.Admin().VM(ctx, lost.vm.UUID)
	if err != nil || len(info.Transactions) != 1 || info.Transactions[0].ID != last || info.Transactions[0].State != string(migrate.DstPending) {
		t.Fatalf("host-a after the restore killed after its prepare: %+v %v, want transaction %s %s", info, err, last, migrate.DstPending)
	}
	rep, err := restore("")
	if err != nil {
		t.Fatalf("the restore after an interrupted one: %v", err)
	}
	if rep.Closed != last || rep.Generation != 2 {
		t.Errorf("restore report %+v, want the interrupted %s closed and generation 2", rep, last)
	}
	startRestored(ctx, t, a, lost)
	if err := fleet.WaitOwnerAmong(ctx, f, lost.vm, []string{fleet.HostA, hostD}, fleet.HostA, time.Minute); err != nil {
		t.Fatal(err)
	}
}

// TestRestoreRegistryNone (issue 14) restores in registry mode none: no
// registry transaction; the destination's own rules (its high-water mark,
// the relay's attestation) decide. The VM, whose owner died with its TPM,
// comes back on host-a from its bundle at generation 2 with 2 of 3
// custodians (host-d's vtpmd attests host-a and relays: in mode none a
// vtpmd reaches only its static peers, which do not include itself),
// nothing pending, and the tenant's secret unseals; the replayed bundle is
// then refused by host-a's high-water mark.
func TestRestoreRegistryNone(t *testing.T) {
	t.Parallel()
	c := newCustodians(t)
	f := escrowFleet(t, c, t.TempDir(), "", inproc.Config{Registry: registry.ModeNone, Hosts: []inproc.HostSpec{{Name: fleet.HostA}, {Name: fleet.HostB}, {Name: hostD}}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	a := f.InProcHost(fleet.HostA)
	lost := loseOwner(ctx, t, f, fleet.HostB, "db")
	r := &recovery.Restorer{Admin: f.InProcHost(hostD).Admin()}
	req := recovery.Request{Bundle: lost.bundle, Identities: c.identities(t, "alice", "carol"), VM: lost.vm.UUID, Dest: fleet.HostA}
	rep, err := r.Restore(ctx, req)
	if err != nil {
		t.Fatalf("restore in registry mode none: %v", err)
	}
	t.Logf("restore in registry mode none: %+v", rep)
	if rep.Generation != 2 || rep.PreviousOwner != "" {
		t.Errorf("restore report %+v, want generation 2 and no previous owner (no registry)", rep)
	}
	startRestored(ctx, t, a, lost)
	if err := fleet.WaitOwnerAmong(ctx, f, lost.vm, []string{fleet.HostA, hostD}, fleet.HostA, time.Minute); err != nil {
		t.Fatal(err)
	}
	if gen, err := fleet.Generation(ctx, a, lost.vm); err != nil || gen != 2 {
		t.Fatalf("generation on host-a: %d, %v, want 2", gen, err)
	}
	// The same bundle again: host-a holds generation 2; the bundle offers 2
	// again, which its high-water mark refuses.
	if _, err := r.Restore(ctx, req); err == nil || !errors.Is(err, migrate.ErrDenied) && !errors.Is(err, migrate.ErrRefused) {
		t.Errorf("the replayed bundle in registry mode none: %v, want a refusal", err)
	} else {
		t.Logf("replayed bundle refused: %v", err)
	}
}
