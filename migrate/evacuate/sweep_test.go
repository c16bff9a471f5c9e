package evacuate_test

import (
	"context"
	"fmt"
	"slices"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/evacuate"
)

// TestFinalSweepMovesArrivals is soak seed 4's finding (wave 5): a VM
// failed over onto the source while it was being evacuated (the
// promotion raced the draining mark) arrives after the inventory. Before
// the final sweep the run reported exit 0 and left it running on the
// draining source. Two VMs arrive: one running, and one the promotion
// left shut off at the inventory and that starts later (it was skipped
// as not running); both are moved. A VM that is not running at the end
// stays, as at the inventory.
func TestFinalSweepMovesArrivals(t *testing.T) {
	f := newFleet(t, 2, GiB, 8*GiB, 8*GiB)
	idle, late, off := vmID(100), vmID(101), vmID(102)
	f.world.AddVM(evacuate.VM{ID: idle, Name: "idle", Memory: GiB, Running: false}, source, 2)
	f.reg.AddVM(idle, source, 2)
	f.ids = append(f.ids, idle, late, off)
	rec := &recorder{}
	rec.hook = func(e evacuate.Event) {
		if e.Type != evacuate.EventPlan {
			return
		}
		// After the inventory: a failover promotes 'late' here, the
		// shut-off 'idle' is started, and 'off' arrives shut off.
		f.world.AddVM(evacuate.VM{ID: late, Name: "late", Memory: GiB, Running: true}, source, 3)
		f.reg.AddVM(late, source, 3)
		f.world.AddVM(evacuate.VM{ID: idle, Name: "idle", Memory: GiB, Running: true}, source, 2)
		f.world.AddVM(evacuate.VM{ID: off, Name: "off", Memory: GiB, Running: false}, source, 2)
		f.reg.AddVM(off, source, 2)
	}
	p := f.process()
	rep, err := f.evacuator(t, p, rec).Run(ctxT(t), evacuate.Options{Parallel: 2, Headroom: evacuate.DefaultHeadroom})
	if err != nil {
		t.Fatal(err)
	}
	if rep.ExitCode != evacuate.ExitOK || counts(rep)[evacuate.OutcomeMoved] != 4 || counts(rep)[evacuate.OutcomeSkipped] != 0 {
		t.Fatalf("exit %d, counts %v; want 4 moved (2 planned, 2 swept), 'off' unreported", rep.ExitCode, rep.Counts)
	}
	for _, id := range []string{late, idle} {
		if w := f.world.Where(id); w == source || w == "" {
			t.Errorf("VM %s runs on %q after the evacuation", id, w)
		}
		if i := slices.IndexFunc(rep.VMs, func(v evacuate.VMReport) bool { return v.VM == id }); i < 0 || rep.VMs[i].Outcome != evacuate.OutcomeMoved {
			t.Errorf("VM %s not reported moved: %+v", id, rep.VMs)
		}
	}
	if w := f.world.Where(off); w != source {
		t.Errorf("the shut-off arrival runs on %q; it stays on the source", w)
	}
	f.ids = slices.DeleteFunc(f.ids, func(id string) bool { return id == off })
	f.checkConsistent(t)
}

// arrivingInventory is the source's hypervisor with a new VM failed over
// onto it before every listing after the first.
type arrivingInventory struct {
	f     *fleet
	inv   evacuate.Inventory
	calls int
}

func (a *arrivingInventory) VMs(ctx context.Context) ([]evacuate.VM, error) {
	if a.calls > 0 {
		id := vmID(200 + a.calls)
		a.f.world.AddVM(evacuate.VM{ID: id, Name: fmt.Sprintf("arrival%d", a.calls), Memory: GiB, Running: true}, source, 2)
		a.f.reg.AddVM(id, source, 2)
		a.f.ids = append(a.f.ids, id)
	}
	a.calls++
	return a.inv.VMs(ctx)
}

// TestFinalSweepBounded: VMs keep arriving; the run sweeps at most 3
// times, moves what it saw, and reports the VM that arrived after its last
// sweep failed (exit code not 0), never an exit 0 with a VM left behind.
func TestFinalSweepBounded(t *testing.T) {
	f := newFleet(t, 1, GiB, 16*GiB)
	p := f.process()
	inv := &arrivingInventory{f: f, inv: f.world.Inventory(source)}
	e, err := evacuate.New(evacuate.Config{
		Source: source, Fleet: p.client, Ownership: p.client, Records: p.client,
		Inventory: inv, Capacity: f.world, Mover: p.mover,
		Session: p.client.Session(), Now: f.clock.Now, Sleep: f.clock.Sleep,
	})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := e.Run(ctxT(t), evacuate.Options{Parallel: 2, Headroom: evacuate.DefaultHeadroom})
	if err != nil {
		t.Fatal(err)
	}
	// 1 planned + 3 swept moved; the 4th arrival, seen by the last look, is failed.
	if c := counts(rep); c[evacuate.OutcomeMoved] != 4 || c[evacuate.OutcomeFailed] != 1 || rep.ExitCode == evacuate.ExitOK {
		t.Fatalf("exit %d, counts %v; want 4 moved, 1 failed, exit not 0", rep.ExitCode, rep.Counts)
	}
	last := vmID(200 + 4)
	if w := f.world.Where(last); w != source {
		t.Fatalf("the last arrival runs on %q, want the source (reported failed)", w)
	}
}
