package inproc_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/evacuate"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/operator"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// hostD (trust_test.go) is, in the evacuation fleet, booted from the tampered log:
// every plan leaves it out, refused by attestation.

// evacVM is a VM of an evacuation test with what it must keep.
type evacVM struct {
	fleet.VM
	secret string
	gen    uint64 // its generation before the evacuation
}

// evacRun is one 'vtpmctl evacuate' as the operator runs it.
type evacRun struct {
	end    adminapi.EvacuateEnd
	events []evacuate.Event
	report *evacuate.Report
}

func (r evacRun) of(t evacuate.EventType) []evacuate.Event {
	var out []evacuate.Event
	for _, e := range r.events {
		if e.Type == t {
			out = append(out, e)
		}
	}
	return out
}

// TestEvacuate evacuates host-a on a fleet of four real vtpmds (host-d
// tampered), registry embedded, fake hypervisor: the plan (dry run), an
// evacuation end to end, vtpmctl stopped and run again, the source vtpmd
// killed and restarted half way and run again, and a destination refused
// by attestation half way. Each ends with every VM running on exactly one
// host at its generation + 1, nothing pending, and the report telling the
// truth.
func TestEvacuate(t *testing.T) {
	t.Parallel()
	f := newFleetWith(t, inproc.Config{Hosts: []inproc.HostSpec{{Name: fleet.HostA}, {Name: fleet.HostB}, {Name: fleet.HostC}, {Name: hostD, Tampered: true}},
		EvacuationSettle: 30 * time.Second, RegistryTTL: 10 * time.Second})
	ctx := scenarioCtx(t, 10*time.Minute)
	n := 0
	newVMs := func(t *testing.T, k int) []evacVM {
		t.Helper()
		var out []evacVM
		for range k {
			n++
			vm, err := f.CreateVM(ctx, fleet.HostA, fmt.Sprintf("evac-%d", n))
			if err != nil {
				t.Fatal(err)
			}
			secret, err := f.Host(fleet.HostA).TenantSecret(ctx, vm)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, evacVM{VM: vm, secret: secret, gen: 1})
		}
		return out
	}
	undrain := func(t *testing.T) {
		t.Helper()
		if err := f.Operator().SetState(ctx, fleet.HostA, registry.StateActive); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("dry run", func(t *testing.T) {
		vms := newVMs(t, 4)
		r := evacuateA(ctx, t, f, adminapi.EvacuateRequest{DryRun: true}, nil)
		if r.end.ExitCode != evacuate.ExitOK || r.report == nil || !r.report.DryRun {
			t.Fatalf("dry run: exit %d %s", r.end.ExitCode, r.end.Error)
		}
		plans := r.of(evacuate.EventPlan)
		if len(plans) != 1 || !plans[0].DryRun {
			t.Fatalf("plan events: %+v", plans)
		}
		p := plans[0].Plan
		if len(p.Assignments) != len(vms) || len(p.Unplaced) != 0 {
			t.Fatalf("plan: %+v", p)
		}
		per := map[string]int{}
		for _, a := range p.Assignments {
			per[a.Dest]++
		}
		if per[fleet.HostB] != 2 || per[fleet.HostC] != 2 {
			t.Errorf("placement by destination %v, want 2 on host-b and 2 on host-c", per)
		}
		for _, h := range p.Hosts {
			if h.Host == hostD && (h.Eligible || h.Reason != evacuate.ReasonRefused || h.Rule == "") {
				t.Errorf("host-d in the plan: %+v, want refused with its rule", h)
			}
			if h.Host != hostD && !h.Eligible {
				t.Errorf("%s left out: %+v", h.Host, h)
			}
		}
		// A dry run moves, claims, drains and writes nothing.
		if st := hostState(ctx, t, f, fleet.HostA); st != registry.StateActive {
			t.Errorf("host-a is %s after a dry run", st)
		}
		checkOn(ctx, t, f, vms, 0, fleet.HostA)
		// The real run, then the same command again: nothing moves twice.
		r = evacuateA(ctx, t, f, adminapi.EvacuateRequest{}, nil)
		if r.end.ExitCode != evacuate.ExitOK || r.report.Counts[evacuate.OutcomeMoved] != len(vms) {
			t.Fatalf("evacuation: exit %d %s %+v", r.end.ExitCode, r.end.Error, r.report.Counts)
		}
		checkOn(ctx, t, f, vms, 1, fleet.HostB, fleet.HostC)
		if st := hostState(ctx, t, f, fleet.HostA); st != registry.StateDraining {
			t.Errorf("host-a is %s after its evacuation, want draining until undrain", st)
		}
		if len(r.of(evacuate.EventVMPhase)) == 0 || len(r.of(evacuate.EventVMDone)) != len(vms) {
			t.Errorf("progress: %d phase events, %d done", len(r.of(evacuate.EventVMPhase)), len(r.of(evacuate.EventVMDone)))
		}
		st := f.InProcHost(fleet.HostA).Daemon().EvacuationStats()
		if st.Batches != 2 || st.ClaimRTT != 2 || st.CommitRTT != 2 || st.Migrations != len(vms) {
			t.Errorf("stats %+v: want 2 batches, 1 claim and 1 commit round trip each, %d migrations", st, len(vms))
		}
		again := evacuateA(ctx, t, f, adminapi.EvacuateRequest{}, nil)
		if again.end.ExitCode != evacuate.ExitOK || again.report.Counts[evacuate.OutcomeMoved] != 0 {
			t.Errorf("run again: exit %d %+v", again.end.ExitCode, again.report.Counts)
		}
		checkOn(ctx, t, f, vms, 1, fleet.HostB, fleet.HostC)
		undrain(t)
	})

	t.Run("vtpmctl stopped and run again", func(t *testing.T) {
		vms := newVMs(t, 4)
		before := f.InProcHost(fleet.HostA).Daemon().EvacuationStats()
		runCtx, stop := context.WithCancel(ctx)
		defer stop()
		src := f.InProcHost(fleet.HostA)
		var once sync.Once
		var busy evacRun
		var busyErr error
		src.Fake().BeforeMigrateCommit = func() error {
			once.Do(func() {
				// A second operator while this run holds the record: exit 5.
				busy, busyErr = tryEvacuateA(ctx, f, adminapi.EvacuateRequest{}, nil)
				stop() // Ctrl-C: vtpmctl asks vtpmd to stop
				// The same stop, synchronously, so that no second
				// migration can start before it lands.
				src.Daemon().StopEvacuations()
			})
			return nil
		}
		defer func() { src.Fake().BeforeMigrateCommit = nil }()
		r := evacuateA(runCtx, t, f, adminapi.EvacuateRequest{Parallel: 1}, nil)
		src.Fake().BeforeMigrateCommit = nil
		if busyErr != nil || busy.end.ExitCode != evacuate.ExitBusy {
			t.Errorf("a second evacuation during the first: exit %d %q %v, want %d (busy)", busy.end.ExitCode, busy.end.Error, busyErr, evacuate.ExitBusy)
		}
		if r.end.ExitCode != evacuate.ExitInterrupted || !r.report.Interrupted {
			t.Fatalf("stopped run: exit %d %s, report %+v", r.end.ExitCode, r.end.Error, r.report)
		}
		if r.report.Counts[evacuate.OutcomeMoved] != 1 || r.report.Counts[evacuate.OutcomeNotStarted] != len(vms)-1 {
			t.Errorf("stopped run: %+v, want the migration in flight moved and committed, the others not started", r.report.Counts)
		}
		r = evacuateA(ctx, t, f, adminapi.EvacuateRequest{Parallel: 1}, nil)
		if r.end.ExitCode != evacuate.ExitOK || !r.report.Resumed || r.report.Counts[evacuate.OutcomeMoved] != len(vms)-1 {
			t.Fatalf("resumed run: exit %d %s, %+v", r.end.ExitCode, r.end.Error, r.report)
		}
		if i := slices.IndexFunc(r.report.VMs, func(v evacuate.VMReport) bool { return v.Outcome == evacuate.OutcomeSkipped && v.Earlier }); i < 0 {
			t.Errorf("resumed run does not report the VM the first run moved: %+v", r.report.VMs)
		}
		checkOn(ctx, t, f, vms, 1, fleet.HostB, fleet.HostC)
		if got := src.Daemon().EvacuationStats().Migrations - before.Migrations; got != len(vms) {
			t.Errorf("%d hypervisor migrations for %d VMs", got, len(vms))
		}
		undrain(t)
	})

	t.Run("source vtpmd restarted and run again", func(t *testing.T) {
		vms := newVMs(t, 4)
		src := f.InProcHost(fleet.HostA)
		var once sync.Once
		src.Fake().BeforeMigrateCommit = func() error {
			once.Do(func() { _ = src.Kill(ctx) }) // vtpmd dies at its next step; the migration in flight commits in the hypervisor
			return nil
		}
		r, err := tryEvacuateA(ctx, f, adminapi.EvacuateRequest{Parallel: 1}, nil)
		src.Fake().BeforeMigrateCommit = nil
		t.Logf("run killed half way: exit %d %q (stream: %v)", r.end.ExitCode, r.end.Error, err)
		if err == nil && r.end.ExitCode == evacuate.ExitOK {
			t.Errorf("the run whose vtpmd died half way reports success: %+v", r.report)
		}
		if err := src.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		r = evacuateA(ctx, t, f, adminapi.EvacuateRequest{Parallel: 1}, nil)
		if r.end.ExitCode != evacuate.ExitOK || !r.report.Resumed {
			t.Fatalf("run after the restart: exit %d %s %+v", r.end.ExitCode, r.end.Error, r.report)
		}
		checkOn(ctx, t, f, vms, 1, fleet.HostB, fleet.HostC)
		undrain(t)
	})

	t.Run("destination killed: its VMs re-planned", func(t *testing.T) {
		vms := newVMs(t, 4)
		src, dst := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostC)
		// host-c's vtpmd dies in the middle of its batch's Prepare, its
		// PENDING keys and secrets written: the source cannot have the end
		// of the batch confirmed. Recovery aborts what did not move (every
		// VM of it still runs on host-a) and the run re-plans it onto
		// host-b, leaving host-c out; nothing is left open.
		out0 := src.Fake().Stats().MigrationsOut
		var once sync.Once
		dst.OnCrashPoint(func(p migrate.CrashPoint) error {
			if p != migrate.DstAfterSecrets {
				return nil
			}
			once.Do(func() { _ = dst.Kill(ctx) })
			return fmt.Errorf("%w at %s (host-c killed)", migrate.ErrCrash, p)
		})
		r, err := tryEvacuateA(ctx, f, adminapi.EvacuateRequest{}, nil)
		dst.OnCrashPoint(nil)
		if err != nil || r.report == nil {
			t.Fatalf("run with host-c killed: %v %+v", err, r.end)
		}
		t.Logf("run with host-c killed half way: exit %d, %v, excluded %+v", r.end.ExitCode, r.report.Counts, r.report.Excluded)
		killed := false
		once.Do(func() { killed = true }) // the kill never ran: host-c got no batch
		if killed {
			t.Fatal("host-c's vtpmd was never killed: the plan gave it no batch")
		}
		if r.end.ExitCode != evacuate.ExitOK {
			t.Errorf("run with host-c killed: exit %d %s, want every VM re-planned and moved (exit 0)", r.end.ExitCode, r.end.Error)
		}
		failed := r.of(evacuate.EventHostFailed)
		if i := slices.IndexFunc(failed, func(e evacuate.Event) bool { return e.Host == fleet.HostC && e.Replanned > 0 }); i < 0 {
			t.Errorf("host-failed events %+v, want host-c with its VMs re-planned", failed)
		}
		if i := slices.IndexFunc(r.report.Excluded, func(x evacuate.ExcludedHost) bool { return x.Host == fleet.HostC && x.Reason == evacuate.ReasonFailed }); i < 0 {
			t.Errorf("report excludes %+v, want host-c (failed)", r.report.Excluded)
		}
		for _, v := range r.report.VMs {
			if v.Outcome != evacuate.OutcomeMoved || v.Host != fleet.HostB || v.Generation != 2 {
				t.Errorf("%s reported %s on %s at generation %d, want moved to host-b at 2 (%s)", v.Name, v.Outcome, v.Host, v.Generation, v.Detail)
			}
		}
		// host-c back: its recovery drops the PENDING keys and secrets of
		// the aborted batch; every VM runs on host-b alone.
		if err := dst.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		for _, vm := range vms {
			if err := fleet.WaitOwner(ctx, f, vm.VM, fleet.HostB, time.Minute); err != nil {
				t.Fatal(err)
			}
		}
		checkOn(ctx, t, f, vms, 1, fleet.HostB)
		// Never moved twice: one hypervisor migration per VM.
		if n := src.Fake().Stats().MigrationsOut - out0; n != len(vms) {
			t.Errorf("host-a's hypervisor migrated %d VMs out, want %d", n, len(vms))
		}
		undrain(t)
	})

	t.Run("destination killed after its VMs moved: reported open", func(t *testing.T) {
		vms := newVMs(t, 4)
		src, dst := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostC)
		// host-c's vtpmd dies once its batch's VMs run there (the registry
		// committed them to host-c): the source cannot have host-c promote
		// their keys. Where they run is known to the registry, not yet
		// confirmed by host-c: they are reported open (not moved, not
		// re-planned: never moved twice), with no host named.
		var once sync.Once
		src.OnCrashPoint(func(p migrate.CrashPoint) error {
			if p == migrate.SrcAfterRegCommit {
				for _, v := range vms {
					if d, err := dst.Fake().Domain(ctx, v.UUID); err == nil && d.State == hypervisor.StateRunning {
						once.Do(func() { _ = dst.Kill(ctx) })
						break
					}
				}
			}
			return nil
		})
		r, err := tryEvacuateA(ctx, f, adminapi.EvacuateRequest{}, nil)
		src.OnCrashPoint(nil)
		if err != nil || r.report == nil {
			t.Fatalf("run with host-c killed after the commit: %v %+v", err, r.end)
		}
		t.Logf("run with host-c killed after its commit: exit %d, %v", r.end.ExitCode, r.report.Counts)
		if r.end.ExitCode != evacuate.ExitOpen || r.report.Counts[evacuate.OutcomeOpen] == 0 {
			t.Fatalf("exit %d %v, want exit %d with host-c's VMs open", r.end.ExitCode, r.report.Counts, evacuate.ExitOpen)
		}
		for _, v := range r.report.VMs {
			switch v.Outcome {
			case evacuate.OutcomeOpen:
				if v.Host != "" || v.Dest != fleet.HostC {
					t.Errorf("%s reported open on %q (to %s), want no host named, to host-c", v.Name, v.Host, v.Dest)
				}
			case evacuate.OutcomeMoved:
				if v.Host != fleet.HostB {
					t.Errorf("%s reported moved to %s", v.Name, v.Host)
				}
			default:
				t.Errorf("%s: %s (%s)", v.Name, v.Outcome, v.Detail)
			}
		}
		out0 := src.Fake().Stats().MigrationsOut
		if err := dst.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		r = evacuateA(ctx, t, f, adminapi.EvacuateRequest{}, nil)
		if r.end.ExitCode != evacuate.ExitOK || r.report.Counts[evacuate.OutcomeMoved] != 0 {
			t.Fatalf("run after host-c's restart: exit %d %s %+v, want nothing left to move", r.end.ExitCode, r.end.Error, r.report.Counts)
		}
		if n := src.Fake().Stats().MigrationsOut - out0; n != 0 {
			t.Errorf("the run after host-c's restart migrated %d VMs again", n)
		}
		checkOn(ctx, t, f, vms, 1, fleet.HostB, fleet.HostC)
		undrain(t)
	})

	// vtpmd's inventory once listed only VMs with a record ('vm create'):
	// a host whose VMs arrived by migration planned nothing and exited 0
	// with its VMs still there (found on the libvirt lab).
	t.Run("VMs that arrived by migration", func(t *testing.T) {
		vms := newVMs(t, 2)
		r := evacuateA(ctx, t, f, adminapi.EvacuateRequest{To: []string{fleet.HostB}}, nil)
		if r.end.ExitCode != evacuate.ExitOK {
			t.Fatalf("evacuate host-a: exit %d %s", r.end.ExitCode, r.end.Error)
		}
		checkOn(ctx, t, f, vms, 1, fleet.HostB)
		undrain(t)
		r = evacuateHost(ctx, t, f, fleet.HostB, adminapi.EvacuateRequest{To: []string{fleet.HostA}}, nil)
		if r.end.ExitCode != evacuate.ExitOK || r.report.Counts[evacuate.OutcomeMoved] < len(vms) {
			t.Fatalf("evacuate host-b: exit %d %s %+v, want its %d arrived VMs (at least) moved", r.end.ExitCode, r.end.Error, r.report.Counts, len(vms))
		}
		checkOn(ctx, t, f, vms, 2, fleet.HostA)
		if err := f.Operator().SetState(ctx, fleet.HostB, registry.StateActive); err != nil {
			t.Fatal(err)
		}
		// And back: host-a, which now holds only VMs that arrived, is left
		// empty for the next subtest.
		r = evacuateA(ctx, t, f, adminapi.EvacuateRequest{To: []string{fleet.HostB}}, nil)
		if r.end.ExitCode != evacuate.ExitOK || r.report.Counts[evacuate.OutcomeMoved] < len(vms) {
			t.Fatalf("evacuate host-a again: exit %d %s %+v", r.end.ExitCode, r.end.Error, r.report.Counts)
		}
		checkOn(ctx, t, f, vms, 3, fleet.HostB)
		undrain(t)
	})

	// Last: it leaves host-c untrusted.
	t.Run("destination refused half way", func(t *testing.T) {
		vms := newVMs(t, 4)
		src, dst := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostC)
		var once sync.Once
		src.OnCrashPoint(func(p migrate.CrashPoint) error {
			if p != migrate.SrcAfterBegin {
				return nil
			}
			once.Do(func() {
				// host-c's boot state changes after the plan attested it:
				// its next quote no longer matches its event log.
				if _, err := (tpm2.PCRExtend{PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(7), Auth: tpm2.PasswordAuth(nil)},
					Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: make([]byte, 32)}}}}).Execute(dst.Daemon().Host().Meter()); err != nil {
					t.Errorf("extend host-c's PCR 7: %v", err)
				}
				src.Daemon().Node().ForgetEvidence(fleet.HostC)
			})
			return nil
		})
		defer src.OnCrashPoint(nil)
		r := evacuateA(ctx, t, f, adminapi.EvacuateRequest{}, nil)
		if r.end.ExitCode != evacuate.ExitOK || r.report.Counts[evacuate.OutcomeMoved] != len(vms) {
			t.Fatalf("evacuation with host-c refused half way: exit %d %s %+v", r.end.ExitCode, r.end.Error, r.report)
		}
		// host-d is refused when the plan attests it; host-c half way.
		refused := r.of(evacuate.EventHostRefused)
		i := slices.IndexFunc(refused, func(e evacuate.Event) bool { return e.Host == fleet.HostC })
		if i < 0 || refused[i].Rule == "" || refused[i].Replanned != 2 {
			t.Errorf("host-refused events %+v, want host-c with its rule and 2 VMs re-planned", refused)
		}
		if i := slices.IndexFunc(r.report.Excluded, func(x evacuate.ExcludedHost) bool { return x.Host == fleet.HostC && x.Reason == evacuate.ReasonRefused }); i < 0 {
			t.Errorf("report excludes %+v, want host-c refused", r.report.Excluded)
		}
		checkOn(ctx, t, f, vms, 1, fleet.HostB)
		undrain(t)
	})
}

func scenarioCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// evacuateA runs 'vtpmctl evacuate host-a' (operator.Evacuate: the
// operator's drain, then host-a's vtpmd) and collects its events.
func evacuateA(ctx context.Context, t *testing.T, f *inproc.Fleet, req adminapi.EvacuateRequest, on func(evacuate.Event)) evacRun {
	t.Helper()
	return evacuateHost(ctx, t, f, fleet.HostA, req, on)
}

// evacuateHost runs 'vtpmctl evacuate HOST'.
func evacuateHost(ctx context.Context, t *testing.T, f *inproc.Fleet, host string, req adminapi.EvacuateRequest, on func(evacuate.Event)) evacRun {
	t.Helper()
	r, err := tryEvacuate(ctx, f, host, req, on)
	if err != nil {
		t.Fatalf("evacuate %s: %v", host, err)
	}
	if r.report == nil {
		t.Fatalf("evacuate %s: no report (exit %d %s)", host, r.end.ExitCode, r.end.Error)
	}
	return r
}

func tryEvacuateA(ctx context.Context, f *inproc.Fleet, req adminapi.EvacuateRequest, on func(evacuate.Event)) (evacRun, error) {
	return tryEvacuate(ctx, f, fleet.HostA, req, on)
}

func tryEvacuate(ctx context.Context, f *inproc.Fleet, host string, req adminapi.EvacuateRequest, on func(evacuate.Event)) (evacRun, error) {
	req.Host = host
	var r evacRun
	end, err := operator.Evacuate(ctx, f.Operator(), f.InProcHost(host).Admin(), req, func(line []byte) error {
		var ev evacuate.Event
		if err := json.Unmarshal(line, &ev); err != nil {
			return err
		}
		r.events = append(r.events, ev)
		if ev.Type == evacuate.EventReport {
			r.report = ev.Report
		}
		if on != nil {
			on(ev)
		}
		return nil
	})
	r.end = end
	return r, err
}

func hostState(ctx context.Context, t *testing.T, f *inproc.Fleet, host string) registry.HostState {
	t.Helper()
	v, err := f.Operator().Hosts(ctx, host)
	if err != nil {
		t.Fatal(err)
	}
	return v.Hosts[host].State
}

// checkOn checks that every VM runs on exactly one host, one of hosts,
// which the registry shows owning it at its generation + step with no
// open transaction, which alone holds its key and its hypervisor secret
// with nothing pending anywhere (fleet.Owner), and whose vTPM still
// unseals the tenant's secret.
func checkOn(ctx context.Context, t *testing.T, f *inproc.Fleet, vms []evacVM, step uint64, hosts ...string) {
	t.Helper()
	ids := make([]string, len(vms))
	for i, vm := range vms {
		ids[i] = vm.UUID
	}
	view, err := f.Operator().VMs(ctx, ids...)
	if err != nil {
		t.Fatal(err)
	}
	for _, vm := range vms {
		var running []string
		for _, h := range f.HostNames() {
			d, err := f.InProcHost(h).Fake().Domain(ctx, vm.UUID)
			if err == nil && d.State == hypervisor.StateRunning {
				running = append(running, h)
			}
		}
		rec := view.VMs[vm.UUID]
		switch {
		case len(running) != 1:
			t.Errorf("%s runs on %v, want exactly one host", vm.Name, running)
			continue
		case !slices.Contains(hosts, running[0]):
			t.Errorf("%s runs on %s, want one of %v", vm.Name, running[0], hosts)
		case rec.Owner != running[0] || rec.Generation != vm.gen+step || rec.Tx != nil:
			t.Errorf("%s runs on %s; the registry shows %s at generation %d (open %v), want %s at %d with nothing open",
				vm.Name, running[0], rec.Owner, rec.Generation, rec.Tx, running[0], vm.gen+step)
		}
		if owner, views, err := fleet.Owner(ctx, f, vm.VM); err != nil || owner != running[0] {
			t.Errorf("%s: owner %s %v\n%s", vm.Name, owner, err, views)
		}
		info, err := f.InProcHost(running[0]).Admin().VM(ctx, vm.UUID)
		if err != nil || !info.Owned || info.PendingTx != "" || info.Generation != vm.gen+step {
			t.Errorf("%s on %s: %+v %v, want owned at generation %d with nothing pending", vm.Name, running[0], info, err, vm.gen+step)
		}
		if s, err := f.InProcHost(running[0]).TenantSecret(ctx, vm.VM); err != nil || s != vm.secret {
			t.Errorf("%s on %s: tenant secret %q %v, want the one sealed before", vm.Name, running[0], s, err)
		}
	}
}
