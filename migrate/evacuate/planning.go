package evacuate

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/vtpmm/vtpmm/attest"
)

// inventory reads the source's VMs and their registry records (one round
// trip for all of them), decides which are this evacuation's to move, and
// snapshots every candidate destination's free memory.
func (r *run) inventory(ctx context.Context, hosts []Host, prior *Record) error {
	e := r.e
	src := e.cfg.Source
	inv, err := e.cfg.Inventory.VMs(ctx)
	if err != nil {
		return fmt.Errorf("evacuate %s: list VMs: %w", src, err)
	}
	r.prior = map[string]string{}
	if prior != nil {
		for _, a := range prior.Plan {
			r.prior[a.VM] = a.Dest
		}
	}
	onSource := map[string]VM{}
	ids := make([]string, 0, len(inv)+len(r.prior))
	for _, vm := range inv {
		if _, dup := onSource[vm.ID]; dup {
			return fmt.Errorf("evacuate %s: %w: the hypervisor lists VM %s twice", src, ErrBadInput, vm.ID)
		}
		onSource[vm.ID] = vm
		ids = append(ids, vm.ID)
	}
	for id := range r.prior {
		if _, ok := onSource[id]; !ok {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	recs, err := e.cfg.Ownership.VMs(ctx, ids)
	if err != nil {
		return fmt.Errorf("evacuate %s: read VM records: %w", src, err)
	}
	r.recs = recs
	var unsettled []string
	for _, id := range ids {
		vm, here := onSource[id]
		if !here {
			vm = VM{ID: id}
			if i := slices.IndexFunc(prior.Plan, func(a Assignment) bool { return a.VM == id }); i >= 0 {
				vm.Name, vm.Memory = prior.Plan[i].Name, prior.Plan[i].Memory
			}
		}
		r.names[id] = vm.Name
		rec, known := recs[id]
		switch {
		case !known:
			r.finishVM(VMReport{VM: id, Name: vm.Name, Outcome: OutcomeSkipped, Host: hostIf(here, src), Detail: "unknown to the registry"})
		case here && vm.Running && rec.OpenTx != "" && rec.Owner != src:
			// Running here, held by another host's transaction (arriving
			// here, or leaving by another migration): wait for it like
			// the source's own, then classify it again.
			unsettled = append(unsettled, id)
		case rec.Owner != src:
			r.skipOwned(vm, rec)
		case here && !vm.Running:
			r.finishVM(VMReport{VM: id, Name: vm.Name, Outcome: OutcomeSkipped, Host: src, Generation: rec.Generation,
				Detail: "not running: its vTPM stays on this host"})
		case rec.OpenTx != "":
			// Held by a transaction (an earlier run's, or another
			// migration's): it may even run on its destination already.
			onSource[id] = vm
			unsettled = append(unsettled, id)
		case here:
			r.vms[id] = vm
		default:
			r.finishVM(VMReport{VM: id, Name: vm.Name, Outcome: OutcomeSkipped, Generation: rec.Generation,
				Detail: "owned by the source in the registry but no longer defined on its hypervisor"})
		}
	}
	if len(unsettled) > 0 {
		// One bounded wait for all of them, while vtpmd's recovery settles
		// their transactions; then they are classified again.
		recs, err := r.waitSettled(ctx, "", unsettled)
		if err != nil {
			return fmt.Errorf("evacuate %s: %w", src, err)
		}
		running, err := e.cfg.Inventory.VMs(ctx)
		if err != nil {
			return fmt.Errorf("evacuate %s: list VMs: %w", src, err)
		}
		for _, id := range unsettled {
			rec, vm := recs[id], onSource[id]
			runsHere := slices.ContainsFunc(running, func(v VM) bool { return v.ID == id && v.Running })
			switch {
			case rec.Owner != src && rec.Owner != "":
				r.skipOwned(vm, rec)
			case rec.OpenTx != "":
				r.finishVM(VMReport{VM: id, Name: vm.Name, Outcome: OutcomeOpen, TxID: rec.OpenTx, Host: hostIf(runsHere, src),
					Detail: fmt.Sprintf("its transaction is still open after %s; vtpmd's recovery settles it, then run again", r.e.cfg.SettleTimeout)})
			case runsHere:
				r.vms[id] = vm
			default:
				r.finishVM(VMReport{VM: id, Name: vm.Name, Outcome: OutcomeSkipped, Generation: rec.Generation,
					Detail: "settled back to the source, which does not run it"})
			}
		}
	}
	to := map[string]bool{}
	for _, t := range r.opts.To {
		to[t] = true
	}
	for _, h := range hosts {
		if h.Name == src {
			continue
		}
		c := Candidate{Host: h}
		if h.State == HostActive && h.Live && h.Enrolled && (len(to) == 0 || to[h.Name]) {
			free, err := e.cfg.Capacity.FreeMemory(ctx, h.Name)
			if err != nil {
				c.FreeErr = err.Error()
			}
			c.Free = free
		}
		r.hosts = append(r.hosts, c)
	}
	return nil
}

func hostIf(ok bool, h string) string {
	if ok {
		return h
	}
	return ""
}

// skipOwned reports a VM another host owns: moved by an earlier run of
// this evacuation, or by someone else.
func (r *run) skipOwned(vm VM, rec VMRecord) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.skipOwnedLocked(vm, rec)
}

// skipOwnedLocked is skipOwned with r.mu held.
func (r *run) skipOwnedLocked(vm VM, rec VMRecord) {
	rep := VMReport{VM: vm.ID, Name: vm.Name, Outcome: OutcomeSkipped, Host: rec.Owner, Dest: rec.Owner, Generation: rec.Generation}
	if r.prior[vm.ID] == rec.Owner {
		rep.Earlier, rep.Detail = true, "already moved"
	} else {
		rep.Detail = fmt.Sprintf("owned by %s in the registry", rec.Owner)
	}
	r.finishLocked(rep)
}

// planAndAttest plans, attests every destination the plan uses (all at
// once: each is its own TPM), and re-plans without the refused ones until
// every planned destination has attested.
func (r *run) planAndAttest(ctx context.Context) error {
	attested := map[string]bool{}
	prior := r.prior
	for {
		r.mu.Lock()
		p, err := r.makePlan(prior, nil)
		r.mu.Unlock()
		if err != nil {
			return fmt.Errorf("evacuate %s: %w", r.e.cfg.Source, err)
		}
		var todo []BatchPlan
		for _, b := range p.Batches() {
			if !attested[b.Dest] {
				todo = append(todo, b)
			}
		}
		if len(todo) == 0 {
			r.mu.Lock()
			r.plan = &p
			for _, a := range p.Assignments {
				r.planned[a.VM] = a.Dest
			}
			for _, u := range p.Unplaced {
				r.unplaced(u)
			}
			r.mu.Unlock()
			return nil
		}
		errs := make([]error, len(todo))
		var wg sync.WaitGroup
		for i, b := range todo {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for _, a := range b.VMs {
					r.phase(a.VM, b.Dest, PhaseAttest, 0, 0, 0, "")
				}
				errs[i] = r.e.cfg.Mover.Attest(ctx, b.Dest)
			}()
		}
		wg.Wait()
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("evacuate %s: attesting destinations: %w: %w", r.e.cfg.Source, ErrStopped, err)
		}
		for i, b := range todo {
			if errs[i] == nil {
				attested[b.Dest] = true
				continue
			}
			ids := make([]string, 0, len(b.VMs))
			for _, a := range b.VMs {
				ids = append(ids, a.VM)
			}
			r.hostFailed(b.Dest, errs[i], ids)
		}
		prior = map[string]string{}
		for _, a := range p.Assignments {
			if attested[a.Dest] {
				prior[a.VM] = a.Dest
			}
		}
	}
}

// hostFailed takes a destination out of the plan: refused by attestation
// (the error wraps *attest.RefusalError) or failed; ids are its VMs that
// must be re-planned.
func (r *run) hostFailed(host string, err error, ids []string) Exclusion {
	var re *attest.RefusalError
	x := Exclusion{Reason: ReasonFailed, Detail: err.Error()}
	typ := EventHostFailed
	if errors.As(err, &re) {
		x, typ = Exclusion{Reason: ReasonRefused, Rule: string(re.Rule), Detail: re.Error()}, EventHostRefused
	}
	r.mu.Lock()
	r.excluded[host] = x
	for _, id := range ids {
		r.cause[id] = ExcludedHost{Host: host, Reason: x.Reason, Rule: x.Rule, Detail: x.Detail}
	}
	r.mu.Unlock()
	r.e.log.WithError(err).WithField("host", host).Warn("destination left out of the evacuation")
	r.emit(Event{Type: typ, Host: host, Rule: x.Rule, Detail: x.Detail, Replanned: len(ids)})
	return x
}

// makePlan plans the VMs in scope plus extra, keeping prior; r.mu held.
func (r *run) makePlan(prior map[string]string, only map[string]bool) (Plan, error) {
	vms := make([]VM, 0, len(r.vms))
	for id, vm := range r.vms {
		if only == nil || only[id] {
			vms = append(vms, vm)
		}
	}
	return MakePlan(Input{Source: r.e.cfg.Source, VMs: vms, Hosts: r.hosts, To: r.opts.To,
		Headroom: r.opts.Headroom, Excluded: r.excluded, Prior: prior})
}

// unplaced reports a VM no host can take; r.mu held.
func (r *run) unplaced(u Unplaced) {
	rep := VMReport{VM: u.VM, Name: u.Name, Outcome: OutcomeUnplaced, Host: r.e.cfg.Source, Detail: string(u.Reason) + ": " + u.Detail}
	if c, ok := r.cause[u.VM]; ok && c.Reason == ReasonRefused {
		rep.Outcome, rep.Dest, rep.Rule = OutcomeRefused, c.Host, c.Rule
		rep.Detail = "no other trusted host has room: " + u.Detail
	}
	delete(r.planned, u.VM)
	r.finishLocked(rep)
}

func (r *run) finishDryRun() *Report {
	r.mu.Lock()
	for _, a := range r.plan.Assignments {
		r.results[a.VM] = VMReport{VM: a.VM, Name: a.Name, Outcome: OutcomePlanned, Dest: a.Dest, Host: r.e.cfg.Source}
	}
	rep := r.snapshotReport()
	r.mu.Unlock()
	rep.finalize(r.e.cfg.Now().Sub(r.start))
	r.emit(Event{Type: EventReport, Report: rep})
	return rep
}

// finish writes the record's final state and reports.
func (r *run) finish(ctx context.Context) *Report {
	r.release(ctx)
	r.mu.Lock()
	rep := r.snapshotReport()
	rep.Interrupted = ctx.Err() != nil || r.lost
	r.mu.Unlock()
	rep.finalize(r.e.cfg.Now().Sub(r.start))
	r.emit(Event{Type: EventReport, Report: rep})
	return rep
}

// snapshotReport copies the run's results into the report; r.mu held.
func (r *run) snapshotReport() *Report {
	rep := r.report
	rep.Plan = r.plan
	rep.VMs = slices.Collect(maps.Values(r.results))
	rep.Excluded = r.exclusions()
	return rep
}

// finalState is the record's state at the end of a run.
func (r *run) finalState() RecordState {
	r.mu.Lock()
	defer r.mu.Unlock()
	state := StateDone
	for _, v := range r.results {
		switch v.Outcome {
		case OutcomeNotStarted:
			return StateInterrupted
		case OutcomeFailed, OutcomeOpen, OutcomeRefused, OutcomeUnplaced:
			state = StateIncomplete
		}
	}
	for id := range r.vms {
		if _, ok := r.results[id]; !ok {
			return StateInterrupted // planned, never reached (stopped while planning)
		}
	}
	return state
}

// currentPlan is the plan as it stands, for the record; r.mu held.
func (r *run) currentPlan() []Assignment {
	out := make([]Assignment, 0, len(r.planned))
	for id, d := range r.planned {
		vm := r.vms[id]
		out = append(out, Assignment{VM: id, Name: vm.Name, Memory: vm.Memory, Dest: d})
	}
	slices.SortFunc(out, func(a, b Assignment) int { return cmp.Compare(a.VM, b.VM) })
	return out
}

// exclusions lists the hosts taken out in this run; r.mu held.
func (r *run) exclusions() []ExcludedHost {
	out := make([]ExcludedHost, 0, len(r.excluded))
	for h, x := range r.excluded {
		out = append(out, ExcludedHost{Host: h, Reason: x.Reason, Rule: x.Rule, Detail: truncate(x.Detail, 1024)})
	}
	slices.SortFunc(out, func(a, b ExcludedHost) int { return cmp.Compare(a.Host, b.Host) })
	return out
}

// outcomes lists the run's per-VM outcomes, for the record; r.mu held.
func (r *run) outcomes() []VMOutcome {
	out := make([]VMOutcome, 0, len(r.results))
	for _, v := range r.results {
		out = append(out, VMOutcome{VM: v.VM, Outcome: v.Outcome, Host: v.Host, Generation: v.Generation,
			Rule: truncate(v.Rule, 64), Detail: truncate(v.Detail, 1024)})
	}
	slices.SortFunc(out, func(a, b VMOutcome) int { return cmp.Compare(a.VM, b.VM) })
	return out
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}
