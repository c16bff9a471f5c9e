package evacuate_test

import (
	"context"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/evacuate"
	"github.com/vtpmm/vtpmm/migrate/evacuate/fake"
)

// TestCancelAndResume: Ctrl-C after 40 VMs moved. No new migration
// starts, those in flight commit, the record says interrupted; running the
// same command again moves the rest, and no VM moves twice.
func TestCancelAndResume(t *testing.T) {
	f := newFleet(t, 100, GiB, 40*GiB, 40*GiB, 40*GiB, 40*GiB)
	ctx, cancel := context.WithCancel(ctxT(t))
	p1 := f.process()
	p1.mover.AfterMigrate = func(_, _ string, n int) {
		if n == 40 {
			cancel() // Ctrl-C
		}
	}
	rep1, err := f.evacuator(t, p1, nil).Run(ctx, evacuate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	c1 := counts(rep1)
	if !rep1.Interrupted || rep1.ExitCode != evacuate.ExitInterrupted || c1[evacuate.OutcomeMoved] < 40 || c1[evacuate.OutcomeMoved] == 100 ||
		c1[evacuate.OutcomeMoved]+c1[evacuate.OutcomeNotStarted] != 100 {
		t.Fatalf("first run: interrupted %v, exit %d, counts %v", rep1.Interrupted, rep1.ExitCode, c1)
	}
	f.checkConsistent(t) // nothing half-done: moved ones committed, the rest untouched
	if r, _ := f.reg.Record(source); r.State != evacuate.StateInterrupted || r.Holder != nil {
		t.Fatalf("record after Ctrl-C: %s, holder %v", r.State, r.Holder)
	}

	p2 := f.process()
	rep2, err := f.evacuator(t, p2, nil).Run(ctxT(t), evacuate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	c2 := counts(rep2)
	if !rep2.Resumed || rep2.Run != 2 || rep2.ExitCode != evacuate.ExitOK ||
		c2[evacuate.OutcomeSkipped] != c1[evacuate.OutcomeMoved] || c2[evacuate.OutcomeMoved] != 100-c1[evacuate.OutcomeMoved] {
		t.Fatalf("second run: resumed %v, run %d, exit %d, counts %v (first moved %d)", rep2.Resumed, rep2.Run, rep2.ExitCode, c2, c1[evacuate.OutcomeMoved])
	}
	for _, v := range rep2.VMs {
		if v.Outcome == evacuate.OutcomeSkipped && (!v.Earlier || v.Host == source) {
			t.Errorf("skipped VM not reported as moved earlier: %+v", v)
		}
	}
	f.checkConsistent(t)
	checkOnce(t, f, p1, p2)
	if r, _ := f.reg.Record(source); r.State != evacuate.StateDone || r.Runs != 2 {
		t.Errorf("record: %s after %d runs", r.State, r.Runs)
	}
}

// TestCrashAndResume: the process running the evacuation dies after 30
// migrations (the 30th moved but not committed; every batch's claim
// open). Running the command again takes the record over (its holder's
// session died), waits for recovery to settle the open transactions (and
// says so), skips what moved, and moves the rest, each VM once.
func TestCrashAndResume(t *testing.T) {
	f := newFleet(t, 100, GiB, 40*GiB, 40*GiB, 40*GiB, 40*GiB)
	p1 := f.process()
	p1.mover.CrashAfter = 30
	_, _ = f.evacuator(t, p1, nil).Run(ctxT(t), evacuate.Options{})
	if r, _ := f.reg.Record(source); r.State != evacuate.StateRunning {
		t.Fatalf("a crashed run left the record %s", r.State)
	}
	if len(f.reg.OpenTxs()) == 0 {
		t.Fatal("the crash left no open transaction: the test tests nothing")
	}
	// vtpmd's recovery settles the open transactions after a while: here,
	// at the waiting run's first poll (its second read of the VMs).
	f.reg.OnVMRead(func(n int) {
		if n == 2 {
			fake.Recover(f.reg, f.world)
		}
	})
	p2 := f.process()
	rec := &recorder{}
	rep, err := f.evacuator(t, p2, rec).Run(ctxT(t), evacuate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.ExitCode != evacuate.ExitOK || !rep.Resumed || counts(rep)[evacuate.OutcomeMoved]+counts(rep)[evacuate.OutcomeSkipped] != 100 ||
		counts(rep)[evacuate.OutcomeSkipped] < 30 {
		t.Fatalf("exit %d, resumed %v, counts %v", rep.ExitCode, rep.Resumed, rep.Counts)
	}
	waits := 0
	for _, e := range rec.ofType(evacuate.EventVMPhase) {
		if e.Phase == evacuate.PhaseWait && e.Detail != "" {
			waits++
		}
	}
	if waits == 0 {
		t.Error("the run waited for recovery without saying so")
	}
	f.checkConsistent(t)
	checkOnce(t, f, p1, p2)
}

// TestOpenTransactionTimesOut: recovery never settles; the run waits its
// bounded time, then reports the VMs open (exit 4) and moves the rest.
func TestOpenTransactionTimesOut(t *testing.T) {
	f := newFleet(t, 10, GiB, 40*GiB)
	p1 := f.process()
	p1.mover.CrashAfter = 3
	_, _ = f.evacuator(t, p1, nil).Run(ctxT(t), evacuate.Options{Parallel: 1})
	start := f.clock.Now()
	rep, err := f.evacuator(t, f.process(), nil).Run(ctxT(t), evacuate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.ExitCode != evacuate.ExitOpen || counts(rep)[evacuate.OutcomeOpen] != 10 {
		t.Fatalf("exit %d, counts %v", rep.ExitCode, rep.Counts)
	}
	if waited := f.clock.Now().Sub(start); waited < 30e9 || waited > 40e9 {
		t.Errorf("waited %s of fake time, want the 30 s settle timeout", waited)
	}
}

// checkOnce: across all runs every VM was live-migrated once and its
// ownership changed once.
func checkOnce(t *testing.T, f *fleet, ps ...*process) {
	t.Helper()
	migrations := map[string]int{}
	for _, p := range ps {
		for id, n := range p.mover.Migrations() {
			migrations[id] += n
		}
	}
	commits := f.reg.Commits()
	for _, id := range f.ids {
		if migrations[id] != 1 || commits[id] != 1 {
			t.Errorf("VM %s: %d migrations, %d commits; want 1 and 1", id, migrations[id], commits[id])
		}
	}
}
