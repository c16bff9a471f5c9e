package evacuate_test

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/migrate/evacuate"
	"github.com/vtpmm/vtpmm/migrate/evacuate/fake"
	"github.com/vtpmm/vtpmm/vtpm"
)

// TestEvacuate100 moves 100 VMs to 4 destinations and checks the budgets
// the fakes can count: one attestation and one transfer key per pair, the
// destination's TPM commands per batch, two registry round trips per
// batch, at most N migrations at once, every VM moved exactly once.
func TestEvacuate100(t *testing.T) {
	f := newFleet(t, 100, GiB, 40*GiB, 40*GiB, 40*GiB, 40*GiB)
	p := f.process()
	rec := &recorder{}
	rep, err := f.evacuator(t, p, rec).Run(ctxT(t), evacuate.Options{Parallel: 4, Headroom: evacuate.DefaultHeadroom})
	if err != nil {
		t.Fatal(err)
	}
	if rep.ExitCode != evacuate.ExitOK || counts(rep)[evacuate.OutcomeMoved] != 100 {
		t.Fatalf("exit %d, counts %v", rep.ExitCode, rep.Counts)
	}
	f.checkConsistent(t)
	for _, d := range f.dests {
		if n := f.placement()[d]; n != 25 {
			t.Errorf("%s got %d VMs, want 25 (balanced)", d, n)
		}
		pair := fake.Pair{Source: source, Dest: d}
		if a, k := p.mover.Attestations()[pair], p.mover.TransferKeys()[pair]; a != 1 || k != 1 {
			t.Errorf("%s: %d attestations, %d transfer keys; want 1 and 1", d, a, k)
		}
		if c := p.mover.DestTPMCommands()[d]; c > 6+fake.AttestCmds {
			t.Errorf("%s ran %d TPM commands for its batch, budget 6 plus evidence (%d)", d, c, fake.AttestCmds)
		}
	}
	for tx, n := range f.reg.TxRoundTrips() {
		if n > 2 {
			t.Errorf("transaction %s took %d registry round trips, budget 2", tx, n)
		}
	}
	if len(f.reg.TxRoundTrips()) != 4 {
		t.Errorf("%d batches, want 4", len(f.reg.TxRoundTrips()))
	}
	for id, n := range p.mover.Migrations() {
		if n != 1 {
			t.Errorf("VM %s migrated %d times", id, n)
		}
	}
	for id, n := range f.reg.Commits() {
		if n != 1 {
			t.Errorf("VM %s committed %d times", id, n)
		}
	}
	if h := f.reg.Host(source); h.State != evacuate.HostDraining {
		t.Errorf("source is %s, want draining until the operator undrains it", h.State)
	}
	r, err := f.reg.Record(source)
	if err != nil || r.State != evacuate.StateDone || r.Holder != nil || len(r.Outcomes) != 100 {
		t.Errorf("record: %+v, %v", r, err)
	}
	if len(rec.ofType(evacuate.EventPlan)) != 1 || len(rec.ofType(evacuate.EventVMDone)) != 100 || len(rec.ofType(evacuate.EventReport)) != 1 {
		t.Errorf("events: %d plan, %d vm-done, %d report", len(rec.ofType(evacuate.EventPlan)),
			len(rec.ofType(evacuate.EventVMDone)), len(rec.ofType(evacuate.EventReport)))
	}
	// Cold (first) run: 4 destinations with fresh evidence each.
	if m := evacuate.ModelTPM(vtpm.ProfileDTPM, 4, 4); m.Commands != 32 || m.Time.Milliseconds() != 3400 {
		t.Errorf("cold model %+v", m)
	}
}

// TestDestinationRefusedHalfWay: host-e's batch is held back until 50 VMs
// have moved elsewhere; by then host-e rebooted into a state the policy
// refuses. Its VMs are re-planned onto the other three; everything moves
// once, and the report names the rule.
func TestDestinationRefusedHalfWay(t *testing.T) {
	f := newFleet(t, 100, GiB, 40*GiB, 40*GiB, 40*GiB, 40*GiB)
	p := f.process()
	half := make(chan struct{})
	p.mover.AfterMigrate = func(_, _ string, n int) {
		if n == 50 {
			p.mover.Refuse("host-e", attest.RulePCRPolicy, "PCR 0 differs from policy")
			close(half)
		}
	}
	p.mover.BeforeMove = func(b evacuate.Batch) {
		if b.Dest == "host-e" {
			<-half
		}
	}
	rec := &recorder{}
	rep, err := f.evacuator(t, p, rec).Run(ctxT(t), evacuate.Options{Headroom: evacuate.DefaultHeadroom})
	if err != nil {
		t.Fatal(err)
	}
	if rep.ExitCode != evacuate.ExitOK || counts(rep)[evacuate.OutcomeMoved] != 100 {
		t.Fatalf("exit %d, counts %v", rep.ExitCode, rep.Counts)
	}
	f.checkConsistent(t)
	if n := f.placement()["host-e"]; n != 0 {
		t.Errorf("refused host-e runs %d VMs", n)
	}
	refused := rec.ofType(evacuate.EventHostRefused)
	if len(refused) != 1 || refused[0].Host != "host-e" || refused[0].Rule != string(attest.RulePCRPolicy) || refused[0].Replanned != 25 {
		t.Fatalf("host-refused events: %+v", refused)
	}
	if len(rep.Excluded) != 1 || rep.Excluded[0].Rule != string(attest.RulePCRPolicy) {
		t.Errorf("report excluded %+v", rep.Excluded)
	}
	for pair, n := range p.mover.Attestations() {
		want := 1
		if pair.Dest == "host-e" {
			want = 2 // accepted when planning, refused when its batch started
		}
		if n != want {
			t.Errorf("%v: %d attestations, want %d", pair, n, want)
		}
	}
	for pair, n := range p.mover.TransferKeys() {
		// One per pair, plus one follow-up batch per pair that took
		// re-planned VMs; the refused host got none.
		if pair.Dest == "host-e" && n != 0 || pair.Dest != "host-e" && n > 2 {
			t.Errorf("%v: %d transfer keys", pair, n)
		}
	}
	for id, n := range f.reg.Commits() {
		if n != 1 {
			t.Errorf("VM %s committed %d times", id, n)
		}
	}
	r, _ := f.reg.Record(source)
	if len(r.Excluded) != 1 || r.Excluded[0].Host != "host-e" {
		t.Errorf("record excluded: %+v", r.Excluded)
	}
}

// TestNothingLeftAfterRefusal: the only destination allowed is refused;
// every VM keeps running on the source and the report says which rule.
func TestNothingLeftAfterRefusal(t *testing.T) {
	f := newFleet(t, 6, GiB, 40*GiB, 40*GiB)
	p := f.process()
	p.mover.Refuse("host-b", attest.RuleEKChain, "EK certificate does not chain to a trusted root")
	rep, err := f.evacuator(t, p, nil).Run(ctxT(t), evacuate.Options{To: []string{"host-b"}})
	if err != nil {
		t.Fatal(err)
	}
	if rep.ExitCode != evacuate.ExitRefused || counts(rep)[evacuate.OutcomeRefused] != 6 {
		t.Fatalf("exit %d, counts %v", rep.ExitCode, rep.Counts)
	}
	for _, v := range rep.VMs {
		if v.Rule != string(attest.RuleEKChain) || v.Host != source {
			t.Errorf("VM %s: %+v", v.VM, v)
		}
	}
	if f.placement()[source] != 6 {
		t.Errorf("placement %v", f.placement())
	}
	f.checkConsistent(t)
	if len(f.reg.TxRoundTrips()) != 0 {
		t.Errorf("VMs were claimed for a refused destination: %v", f.reg.TxRoundTrips())
	}
}

// TestDestinationFailsMidBatch: host-c dies after 10 of its VMs arrived.
// Those 10 are committed there; the rest roll back to the source and are
// re-planned onto the others.
func TestDestinationFailsMidBatch(t *testing.T) {
	f := newFleet(t, 100, GiB, 40*GiB, 40*GiB, 40*GiB, 40*GiB)
	p := f.process()
	f.world.KillAfter("host-c", 10)
	rec := &recorder{}
	rep, err := f.evacuator(t, p, rec).Run(ctxT(t), evacuate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.ExitCode != evacuate.ExitOK || counts(rep)[evacuate.OutcomeMoved] != 100 {
		t.Fatalf("exit %d, counts %v", rep.ExitCode, rep.Counts)
	}
	f.checkConsistent(t)
	if n := f.placement()["host-c"]; n != 10 {
		t.Errorf("host-c runs %d VMs, want the 10 that arrived before it died", n)
	}
	failed := rec.ofType(evacuate.EventHostFailed)
	if len(failed) != 1 || failed[0].Host != "host-c" || failed[0].Replanned != 15 {
		t.Fatalf("host-failed events: %+v", failed)
	}
	if failed[0].Detail == "" {
		t.Error("host-failed without a detail")
	}
}

// TestMigrationFailsMissingKey: one VM's key is missing on the
// destination, so libvirt refuses its migration; it keeps running on the
// source at its generation, the others move, exit code 3.
func TestMigrationFailsMissingKey(t *testing.T) {
	f := newFleet(t, 8, GiB, 40*GiB, 40*GiB)
	p := f.process()
	bad := f.ids[3]
	p.mover.DropKey = map[string]bool{bad: true}
	rep, err := f.evacuator(t, p, nil).Run(ctxT(t), evacuate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.ExitCode != evacuate.ExitFailed || counts(rep)[evacuate.OutcomeFailed] != 1 || counts(rep)[evacuate.OutcomeMoved] != 7 {
		t.Fatalf("exit %d, counts %v", rep.ExitCode, rep.Counts)
	}
	for _, v := range rep.VMs {
		if v.VM == bad && (v.Host != source || v.Outcome != evacuate.OutcomeFailed || v.Detail == "") {
			t.Errorf("failed VM reported as %+v", v)
		}
	}
	if rec, _ := f.reg.VM(bad); rec.Owner != source || rec.Generation != 1 {
		t.Errorf("failed VM's record: %+v", rec)
	}
	f.checkConsistent(t)
	if r, _ := f.reg.Record(source); r.State != evacuate.StateIncomplete {
		t.Errorf("record state %s", r.State)
	}
	// Running the same command again (the fault gone) moves the one left.
	rep, err = f.evacuator(t, f.process(), nil).Run(ctxT(t), evacuate.Options{})
	if err != nil || rep.ExitCode != evacuate.ExitOK || counts(rep)[evacuate.OutcomeMoved] != 1 || counts(rep)[evacuate.OutcomeSkipped] != 7 {
		t.Fatalf("re-run: %v, exit %d, counts %v", err, rep.ExitCode, rep.Counts)
	}
	f.checkConsistent(t)
}

// TestHypervisorFailureRollsBack: a late libvirt failure for one VM.
func TestHypervisorFailureRollsBack(t *testing.T) {
	f := newFleet(t, 4, GiB, 40*GiB)
	p := f.process()
	p.mover.FailVM = map[string]error{f.ids[0]: hypervisor.ErrSecretMismatch}
	rep, err := f.evacuator(t, p, nil).Run(ctxT(t), evacuate.Options{})
	if err != nil || rep.ExitCode != evacuate.ExitFailed {
		t.Fatalf("%v, exit %d", err, rep.ExitCode)
	}
	f.checkConsistent(t)
}

// TestDrainedDestinationRefusedByRegistry: host-e is drained after the
// plan; the registry refuses to let VMs move there, so they are re-planned.
func TestDrainedDestinationRefusedByRegistry(t *testing.T) {
	f := newFleet(t, 40, GiB, 40*GiB, 40*GiB, 40*GiB, 40*GiB)
	p := f.process()
	rec := &recorder{hook: func(e evacuate.Event) {
		if e.Type == evacuate.EventPlan {
			f.reg.SetHost("host-e", evacuate.HostDraining, true)
		}
	}}
	rep, err := f.evacuator(t, p, rec).Run(ctxT(t), evacuate.Options{})
	if err != nil || rep.ExitCode != evacuate.ExitOK {
		t.Fatalf("%v, exit %d, %v", err, rep.ExitCode, rep.Counts)
	}
	if f.placement()["host-e"] != 0 || len(rec.ofType(evacuate.EventHostFailed)) != 1 {
		t.Errorf("placement %v, host-failed %v", f.placement(), rec.ofType(evacuate.EventHostFailed))
	}
	f.checkConsistent(t)
}

func TestSourceRules(t *testing.T) {
	f := newFleet(t, 2, GiB, 40*GiB)
	f.reg.SetHost(source, evacuate.HostFenced, true)
	_, err := f.evacuator(t, f.process(), nil).Run(ctxT(t), evacuate.Options{})
	if !errors.Is(err, evacuate.ErrSourceFenced) {
		t.Fatalf("fenced source: %v", err)
	}
	f.reg.SetHost(source, evacuate.HostActive, true)
	_, err = f.evacuator(t, f.process(), nil).Run(ctxT(t), evacuate.Options{To: []string{"host-x"}})
	if !errors.Is(err, evacuate.ErrUnknownHost) || evacuate.ExitCode(nil, err) != evacuate.ExitError {
		t.Fatalf("--to unknown: %v", err)
	}
}

// TestDryRun plans, attesting the destinations, and changes nothing.
func TestDryRun(t *testing.T) {
	f := newFleet(t, 10, 4*GiB, 40*GiB, 8*GiB, 40*GiB, 40*GiB)
	f.reg.SetHost("host-c", evacuate.HostActive, false) // no liveness lease
	p := f.process()
	p.mover.Refuse("host-d", attest.RuleSecureBoot, "secure boot is not enabled")
	rec := &recorder{}
	rep, err := f.evacuator(t, p, rec).Run(ctxT(t), evacuate.Options{DryRun: true, Headroom: evacuate.DefaultHeadroom})
	if err != nil {
		t.Fatal(err)
	}
	if rep.ExitCode != evacuate.ExitOK || counts(rep)[evacuate.OutcomePlanned] != 10 {
		t.Fatalf("exit %d, counts %v", rep.ExitCode, rep.Counts)
	}
	plan := rec.ofType(evacuate.EventPlan)[0].Plan
	reasons := map[string]evacuate.Reason{}
	for _, h := range plan.Hosts {
		reasons[h.Host] = h.Reason
		if h.Host == "host-d" && h.Rule != string(attest.RuleSecureBoot) {
			t.Errorf("host-d's rule: %q", h.Rule)
		}
	}
	want := map[string]evacuate.Reason{"host-b": "", "host-c": evacuate.ReasonNotLive, "host-d": evacuate.ReasonRefused, "host-e": ""}
	for h, r := range want {
		if reasons[h] != r {
			t.Errorf("%s: reason %q, want %q", h, reasons[h], r)
		}
	}
	if f.placement()[source] != 10 || f.reg.Host(source).State != evacuate.HostActive || len(f.reg.TxRoundTrips()) != 0 {
		t.Error("a dry run changed something")
	}
	if _, err := f.reg.Record(source); !errors.Is(err, evacuate.ErrNotFound) {
		t.Errorf("a dry run wrote the record: %v", err)
	}
}

// TestTwoEvacuators: while one evacuation runs, a second one of the same
// host is refused (ErrBusy, exit 5) and changes nothing.
func TestTwoEvacuators(t *testing.T) {
	f := newFleet(t, 20, GiB, 40*GiB) // one destination: one batch, one claim
	first, second := f.process(), f.process()
	running, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	first.mover.BeforeMove = func(evacuate.Batch) {
		once.Do(func() { close(running) })
		<-release
	}
	type result struct {
		rep *evacuate.Report
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := f.evacuator(t, first, nil).Run(ctxT(t), evacuate.Options{Parallel: 1})
		done <- result{rep, err}
	}()
	<-running
	claimed := f.reg.OpenTxs()
	rep, err := f.evacuator(t, second, nil).Run(ctxT(t), evacuate.Options{})
	if !errors.Is(err, evacuate.ErrBusy) || rep != nil || evacuate.ExitCode(rep, err) != evacuate.ExitBusy {
		t.Fatalf("second evacuator: %v, %v", rep, err)
	}
	if now := f.reg.OpenTxs(); len(now) != len(claimed) {
		t.Errorf("the refused evacuator changed the claims: %d, then %d", len(claimed), len(now))
	}
	close(release)
	r := <-done
	if r.err != nil || r.rep.ExitCode != evacuate.ExitOK {
		t.Fatalf("first evacuator: %v, exit %d", r.err, r.rep.ExitCode)
	}
	f.checkConsistent(t)
}

// TestTwoEvacuatorsStartTogether: both read an empty record at once; the
// compare-and-swap lets one in, and the other, reading again, finds it alive.
func TestTwoEvacuatorsStartTogether(t *testing.T) {
	f := newFleet(t, 8, GiB, 40*GiB)
	a, b := f.process(), f.process()
	gate := make(chan struct{})
	for _, p := range []*process{a, b} {
		p.mover.BeforeMove = func(evacuate.Batch) { <-gate }
	}
	errs := make(chan error, 2)
	for _, p := range []*process{a, b} {
		go func() {
			_, err := f.evacuator(t, p, nil).Run(context.Background(), evacuate.Options{})
			errs <- err
		}()
	}
	first := <-errs // the loser returns while the winner waits at the gate
	close(gate)
	second := <-errs
	busy := 0
	for _, err := range []error{first, second} {
		switch {
		case errors.Is(err, evacuate.ErrBusy):
			busy++
		case err != nil:
			t.Fatal(err)
		}
	}
	if busy != 1 || !errors.Is(first, evacuate.ErrBusy) {
		t.Fatalf("busy %d (first %v, second %v)", busy, first, second)
	}
	f.checkConsistent(t)
}
