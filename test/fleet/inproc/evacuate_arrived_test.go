package inproc_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
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
