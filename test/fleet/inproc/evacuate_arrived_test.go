package inproc_test

import (
	"encoding/json"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/evacuate"
	"github.com/vtpmm/vtpmm/migrate/registry/operator"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// TestEvacuateArrivedVMs (found by test/soak, seed 61): an evacuation
// moves the VMs that came to its host by migration, not only those
// created there. Before the fix the inventory listed only VMs with a
// record made by 'vtpmctl vm create' on this host, so evacuating host-b
// planned nothing, reported exit 0 ("every VM left the source") and left
// the migrated VM running there.
func TestEvacuateArrivedVMs(t *testing.T) {
	t.Parallel()
	f := newFleetWith(t, inproc.Config{Hosts: []inproc.HostSpec{{Name: fleet.HostA}, {Name: fleet.HostB}, {Name: fleet.HostC}},
		EvacuationSettle: 30 * time.Second, RegistryTTL: 10 * time.Second})
	ctx := scenarioCtx(t, 5*time.Minute)
	vm, err := f.CreateVM(ctx, fleet.HostA, "arrived-1")
	if err != nil {
		t.Fatal(err)
	}
	end, err := f.InProcHost(fleet.HostA).Admin().Migrate(ctx, adminapi.MigrateRequest{VMs: []string{vm.UUID}, To: fleet.HostB}, nil)
	if err == nil {
		err = end.Err()
	}
	if err != nil {
		t.Fatalf("migrate to host-b: %v", err)
	}
	var rep *evacuate.Report
	eend, err := operator.Evacuate(ctx, f.Operator(), f.InProcHost(fleet.HostB).Admin(), adminapi.EvacuateRequest{Host: fleet.HostB, To: []string{fleet.HostC}},
		func(line []byte) error {
			var ev evacuate.Event
			if err := json.Unmarshal(line, &ev); err != nil {
				return err
			}
			if ev.Type == evacuate.EventReport {
				rep = ev.Report
			}
			return nil
		})
	if err != nil || rep == nil {
		t.Fatalf("evacuate host-b: %v (exit %d %s)", err, eend.ExitCode, eend.Error)
	}
	if eend.ExitCode != evacuate.ExitOK || rep.Counts[evacuate.OutcomeMoved] != 1 {
		t.Fatalf("evacuate host-b: exit %d, %v (VMs %+v), want the VM that arrived by migration moved", eend.ExitCode, rep.Counts, rep.VMs)
	}
	if err := fleet.WaitOwner(ctx, f, vm, fleet.HostC, time.Minute); err != nil {
		t.Fatal(err)
	}
}

// TestEvacuateArrivingVM (found by test/soak, seed 1017): a VM that runs
// here with its key still PENDING (a plain hypervisor migration in hook
// mode whose source died before it finished) is waited for like the
// source's own open transactions, then moved or reported open; never
// silently left out. Before the fix the inventory left it out (no active
// key here, no record) and the evacuation exited 0 with it still running
// on its host.
func TestEvacuateArrivingVM(t *testing.T) {
	t.Parallel()
	f := newFleetWith(t, inproc.Config{Hosts: []inproc.HostSpec{{Name: fleet.HostA}, {Name: fleet.HostB}, {Name: fleet.HostC}},
		HookMode: true, EvacuationSettle: 3 * time.Second, RegistryTTL: 10 * time.Second})
	ctx := scenarioCtx(t, 5*time.Minute)
	vm, err := f.CreateVM(ctx, fleet.HostA, "arriving-1")
	if err != nil {
		t.Fatal(err)
	}
	a := f.InProcHost(fleet.HostA)
	a.OnCrashPoint(func(p migrate.CrashPoint) error {
		if p == migrate.SrcAfterHypervisor {
			_ = a.Kill(ctx) // the source dies once the VM runs on host-b: host-b's key stays PENDING
			return fmt.Errorf("%w at %s", migrate.ErrCrash, p)
		}
		return nil
	})
	if err := a.PlainMigrate(ctx, vm, fleet.HostB); err != nil {
		t.Logf("plain migration: %v", err)
	}
	a.OnCrashPoint(nil)
	info, err := f.InProcHost(fleet.HostB).Admin().VM(ctx, vm.UUID)
	if err != nil || info.State != "running" || info.PendingTx == "" {
		t.Fatalf("host-b: %+v %v, want the VM running with a pending transaction", info, err)
	}
	var rep *evacuate.Report
	eend, err := operator.Evacuate(ctx, f.Operator(), f.InProcHost(fleet.HostB).Admin(), adminapi.EvacuateRequest{Host: fleet.HostB, To: []string{fleet.HostC}},
		func(line []byte) error {
			var ev evacuate.Event
			if err := json.Unmarshal(line, &ev); err != nil {
				return err
			}
			if ev.Type == evacuate.EventReport {
				rep = ev.Report
			}
			return nil
		})
	if err != nil || rep == nil {
		t.Fatalf("evacuate host-b: %v (exit %d %s)", err, eend.ExitCode, eend.Error)
	}
	i := slices.IndexFunc(rep.VMs, func(v evacuate.VMReport) bool { return v.VM == vm.UUID })
	if i < 0 {
		t.Fatalf("evacuate host-b: exit %d, %v (VMs %+v), want the arriving VM in the report", eend.ExitCode, rep.Counts, rep.VMs)
	}
	// Recovery may settle the arrival while the evacuation waits (then it
	// moves on to host-c), or not (then it is reported open, exit 4).
	got := rep.VMs[i]
	t.Logf("evacuate host-b: exit %d, the arriving VM %s", eend.ExitCode, got.Outcome)
	switch {
	case got.Outcome == evacuate.OutcomeMoved && eend.ExitCode == evacuate.ExitOK:
		if err := fleet.WaitOwnerAmong(ctx, f, vm, []string{fleet.HostB, fleet.HostC}, fleet.HostC, time.Minute); err != nil {
			t.Fatal(err)
		}
	case got.Outcome == evacuate.OutcomeOpen && eend.ExitCode == evacuate.ExitOpen:
	default:
		t.Fatalf("evacuate host-b: exit %d, the arriving VM %+v, want moved (exit 0) or open (exit %d)", eend.ExitCode, got, evacuate.ExitOpen)
	}
}
