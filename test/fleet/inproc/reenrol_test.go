package inproc_test

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate/escrow"
	"github.com/vtpmm/vtpmm/migrate/recovery"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/operator"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// TestReenrolAfterTPMReplaced: host-b loses its TPM, is retired, comes
// back with a new TPM (vtpmd init), and is re-enrolled under its name
// with the new identity (vtpmctl host reenroll): the old identity stays on
// its record; the first enrolment's path still refuses it (rule
// enrolled-once); its VM, which the registry still records on host-b at
// the old generation, comes back from its bundle onto host-b itself (a
// restore onto the owner) and the tenant's secret unseals. The relay
// (host-a) had verified host-b's old TPM just before the loss: its cached
// evidence, made under the old identity, is not used for the new TPM.
func TestReenrolAfterTPMReplaced(t *testing.T) {
	t.Parallel()
	c := newCustodians(t)
	f := escrowFleet(t, c, t.TempDir(), "", inproc.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	a, b := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB)
	op := f.Operator()
	db, err := f.CreateVM(ctx, fleet.HostB, "db")
	if err != nil {
		t.Fatal(err)
	}
	want, err := b.TenantSecret(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := b.Admin().Backup(ctx, adminapi.BackupRequest{VMs: []string{db.UUID}})
	if err != nil || rep.Failed() != 0 || len(rep.Items) != 1 {
		t.Fatalf("backup: %+v, %v", rep, err)
	}
	bundle, err := os.ReadFile(rep.Items[0].Path)
	if err != nil {
		t.Fatal(err)
	}
	// host-a verifies host-b's (old) TPM: evidence cached for 60 s.
	if _, err := a.Admin().RestoreAttest(ctx, fleet.HostB); err != nil {
		t.Fatal(err)
	}
	hv, err := op.Hosts(ctx, fleet.HostB)
	if err != nil {
		t.Fatal(err)
	}
	old := hv.Hosts[fleet.HostB].Enrolment.Identity

	// A host on the TPM it is enrolled with: nothing to replace.
	if _, err := operator.Reenroll(ctx, op, a.Admin(), fleet.HostB, operator.EnrollOptions{Wait: time.Second}); !errors.Is(err, registry.ErrSameIdentity) ||
		!strings.Contains(err.Error(), "rule reenroll-new-identity") {
		t.Fatalf("re-enrolling a host on its enrolled TPM: %v", err)
	}

	// host-b's TPM dies; the operator retires it.
	if err := b.LoseTPM(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err = recovery.Retire(ctx, op, fleet.HostB, false)
		if err == nil || !errors.Is(err, registry.ErrHostLive) || time.Now().After(deadline) {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("retire host-b: %v", err)
	}

	// A new TPM, vtpmd init: the first enrolment's rule still refuses it.
	if err := b.ReplaceTPM(ctx); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		hv, err := op.Hosts(ctx, fleet.HostB)
		if err != nil {
			t.Fatal(err)
		}
		if h := hv.Hosts[fleet.HostB].Host; h != nil && h.Identity.EK != old.EK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("host-b did not register its new TPM identity within 30 s")
		}
	}
	if _, err := f.EnrollVia(ctx, a.Admin(), fleet.HostB); !errors.Is(err, registry.ErrExists) || !strings.Contains(err.Error(), "rule enrolled-once") {
		t.Fatalf("host enroll of the re-initialised host: %v, want rule enrolled-once", err)
	}
	// A restore onto it is refused while it is retired.
	r := &recovery.Restorer{Admin: a.Admin(), Registry: op}
	two := c.identities(t, "alice", "carol")
	if _, err := r.Restore(ctx, recovery.Request{Bundle: bundle, Identities: two, VM: db.UUID, Dest: fleet.HostB, Force: true}); err == nil {
		t.Fatal("restore onto the retired host-b succeeded")
	}

	// The re-enrolment: the new TPM checked, the enrolment replaced.
	rr, err := operator.Reenroll(ctx, op, a.Admin(), fleet.HostB, operator.EnrollOptions{Wait: 30 * time.Second})
	if err != nil {
		t.Fatalf("re-enrol host-b: %v", err)
	}
	t.Logf("re-enrolled host-b: EK %s… replaces %s…, TPM check %s, %d registry requests, %s", rr.New.EK[:16], rr.Old.EK[:16], rr.Check, rr.RegistryOps, rr.Took)
	if rr.Old != old || rr.New.EK == old.EK || rr.New.AK == old.AK {
		t.Fatalf("report: old %+v new %+v, enrolled before %+v", rr.Old, rr.New, old)
	}
	// The relay's audit log names both TPMs.
	log, err := a.Admin().Audit(ctx, "", "host-enrolled")
	if err != nil {
		t.Fatal(err)
	}
	audited := false
	for _, rec := range log.Records {
		audited = audited || (rec.Peer == fleet.HostB && rec.Rule == "identity-retired" && strings.Contains(rec.Detail, rr.New.EK) && strings.Contains(rec.Detail, rr.Old.EK))
	}
	if !audited {
		t.Errorf("no audit record of the re-enrolment naming EK %s… and EK %s…: %+v", rr.New.EK[:16], rr.Old.EK[:16], log.Records)
	}
	hv, err = op.Hosts(ctx, fleet.HostB)
	if err != nil {
		t.Fatal(err)
	}
	hb := hv.Hosts[fleet.HostB]
	if hb.State != registry.StateActive || hb.Enrolment.Identity.EK != rr.New.EK || len(hb.Enrolment.Replaced) != 1 || hb.Enrolment.Replaced[0].Identity != old {
		t.Fatalf("host-b after re-enrolment: %s %+v", hb.State, hb.Enrolment)
	}
	// Again (as after an unknown outcome): nothing to replace.
	if _, err := operator.Reenroll(ctx, op, a.Admin(), fleet.HostB, operator.EnrollOptions{Wait: time.Second}); !errors.Is(err, registry.ErrSameIdentity) {
		t.Fatalf("re-enrolling again: %v", err)
	}

	// The VM is still recorded on host-b at generation 1; host-b's new
	// vault holds no key for it.
	if _, _, err := b.Daemon().Host().Keys().Get(ctx, db.UUID); err == nil {
		t.Fatal("host-b's new vault holds a key of db")
	}
	// The old copy (its domain and encrypted vTPM state, still on host-b)
	// does not start: the hook's start refuses it, naming the rule and
	// what the registry records.
	_, err = b.Admin().HookPrepare(ctx, adminapi.HookRequest{UUID: db.UUID, Name: db.Name})
	if err == nil || !strings.Contains(err.Error(), "rule key-held") || !strings.Contains(err.Error(), "the registry records host-b as its owner at generation 1") {
		t.Fatalf("starting the old copy on host-b: %v", err)
	}
	t.Logf("the old copy on host-b: %v", err)
	// Restore onto its owner, host-b itself (--force: it is its owner).
	if _, err := r.Restore(ctx, recovery.Request{Bundle: bundle, Identities: two, VM: db.UUID, Dest: fleet.HostB}); err == nil {
		t.Fatal("restore onto the owner itself without --force succeeded")
	}
	got, err := r.Restore(ctx, recovery.Request{Bundle: bundle, Identities: two, VM: db.UUID, Dest: fleet.HostB, Force: true})
	if err != nil {
		t.Fatalf("restore onto the re-enrolled host-b: %v", err)
	}
	if got.Generation != 2 {
		t.Errorf("restore report %+v", got)
	}
	v, err := op.VMs(ctx, db.UUID)
	if rec := v.VMs[db.UUID]; err != nil || rec.Owner != fleet.HostB || rec.Generation != 2 || rec.Tx != nil {
		t.Fatalf("registry after the restore: %+v, %v", rec, err)
	}
	// Its domain stayed defined (shut off) on host-b; the restore put the
	// vTPM state in place there.
	if err := b.Fake().StartDomain(ctx, db.UUID); err != nil {
		t.Fatal(err)
	}
	if s, err := b.TenantSecret(ctx, db); err != nil || s != want {
		t.Fatalf("the tenant's secret after the restore onto host-b: %q, %v; want %q", s, err, want)
	}
	// The same bundle again: older than the restored generation.
	if _, err := r.Restore(ctx, recovery.Request{Bundle: bundle, Identities: two, VM: db.UUID, Dest: fleet.HostB, Force: true}); !errors.Is(err, escrow.ErrStaleBundle) {
		t.Errorf("the replayed bundle: %v, want ErrStaleBundle", err)
	}
}
