package evacuate

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/vtpmm/vtpmm/attest"
)

// spawn starts one batch; r.mu held.
func (r *run) spawn(ctx context.Context, b BatchPlan) {
	ids := make([]string, 0, len(b.VMs))
	for _, a := range b.VMs {
		r.assign[a.VM], r.planned[a.VM] = b.Dest, b.Dest
		ids = append(ids, a.VM)
	}
	slices.Sort(ids)
	r.wg.Add(1)
	go r.runBatch(ctx, b.Dest, ids)
}

// runBatch claims the VMs (one registry round trip, the read included),
// hands them to the Mover as one batch, and settles what it reports.
func (r *run) runBatch(ctx context.Context, dest string, ids []string) {
	defer r.wg.Done()
	for _, id := range ids {
		r.phase(id, dest, PhaseQueued, 0, 0, 0, "")
	}
	txID, vms := r.claim(ctx, dest, ids)
	if len(vms) == 0 {
		return
	}
	b := Batch{TxID: txID, Source: r.e.cfg.Source, Dest: dest, VMs: vms}
	res, err := r.e.cfg.Mover.Move(ctx, b, r.slots, func(p Progress) {
		r.phase(p.VM, dest, p.Phase, p.Bytes, p.Total, p.Elapsed, "")
	})
	r.settle(ctx, b, res, err)
}

// claim opens one transaction on the batch's VMs in the registry: a
// compare-and-swap on the revisions last read, whose else branch returns
// the current records, so the claim is also the batch's read. VMs another
// host owns are skipped; VMs held by an open transaction are waited for
// (bounded by SettleTimeout) while recovery settles them.
func (r *run) claim(ctx context.Context, dest string, ids []string) (string, []BatchVM) {
	src := r.e.cfg.Source
	txID, err := r.newTxID()
	if err != nil {
		r.failAll(ids, dest, fmt.Sprintf("transaction id: %v", err))
		return "", nil
	}
	pending, waited := ids, false
	for attempt := 0; attempt < 4; attempt++ {
		var claimable, open []string
		r.mu.Lock()
		for _, id := range pending {
			rec, ok := r.recs[id]
			switch {
			case !ok:
				r.finishLocked(VMReport{VM: id, Name: r.names[id], Outcome: OutcomeSkipped, Detail: "no longer in the registry"})
			case rec.Owner != src:
				r.skipOwnedLocked(r.vms[id], rec)
			case rec.OpenTx != "" && waited:
				r.finishLocked(VMReport{VM: id, Name: r.names[id], Outcome: OutcomeOpen, Host: src, TxID: rec.OpenTx, Dest: dest,
					Detail: fmt.Sprintf("its transaction is still open after %s; vtpmd's recovery settles it, then run again", r.e.cfg.SettleTimeout)})
			case rec.OpenTx != "":
				open = append(open, id)
			default:
				claimable = append(claimable, id)
			}
		}
		r.mu.Unlock()
		if len(open) > 0 {
			if _, err := r.waitSettled(ctx, dest, open); err != nil {
				r.notStarted(append(claimable, open...), dest, err.Error())
				return "", nil
			}
			pending, waited = append(claimable, open...), true
			continue
		}
		if len(claimable) == 0 {
			return "", nil
		}
		if r.stopping(ctx) {
			r.notStarted(claimable, dest, "stopped before its batch started")
			return "", nil
		}
		expect := make(map[string]int64, len(claimable))
		r.mu.Lock()
		for _, id := range claimable {
			expect[id] = r.recs[id].Revision
		}
		r.mu.Unlock()
		res, err := r.e.cfg.Ownership.Claim(ctx, Claim{TxID: txID, Source: src, Dest: dest, Expect: expect})
		if errors.Is(err, ErrHostNotActive) {
			r.hostFailed(dest, err, claimable)
			r.replan(ctx, claimable)
			return "", nil
		}
		if err != nil && r.stopping(ctx) {
			r.notStarted(claimable, dest, "stopped before its batch started")
			return "", nil
		}
		if err != nil {
			r.failAll(claimable, dest, fmt.Sprintf("registry claim: %v", err))
			return "", nil
		}
		r.mu.Lock()
		maps.Copy(r.recs, res.Records)
		r.mu.Unlock()
		if res.OK {
			vms := make([]BatchVM, 0, len(claimable))
			for _, id := range claimable {
				vm := r.vms[id]
				vms = append(vms, BatchVM{ID: id, Name: vm.Name, Memory: vm.Memory, Generation: res.Records[id].Generation})
			}
			return txID, vms
		}
		pending = claimable // something changed: classify again with the records just read
	}
	r.failAll(pending, dest, "the registry records kept changing while being claimed")
	return "", nil
}

// waitSettled polls the records of ids (one round trip per poll) until no
// transaction holds any of them, or SettleTimeout passed.
func (r *run) waitSettled(ctx context.Context, dest string, ids []string) (map[string]VMRecord, error) {
	deadline := r.e.cfg.Now().Add(r.e.cfg.SettleTimeout)
	txs := make([]string, len(ids))
	r.mu.Lock()
	for i, id := range ids {
		txs[i] = r.recs[id].OpenTx
	}
	r.mu.Unlock()
	for i, id := range ids {
		r.phase(id, dest, PhaseWait, 0, 0, 0, fmt.Sprintf("transaction %s is open; waiting up to %s for recovery to settle it", txs[i], r.e.cfg.SettleTimeout))
	}
	r.e.log.WithField("vms", len(ids)).Infof("waiting up to %s for open transactions to be settled", r.e.cfg.SettleTimeout)
	for {
		if err := r.e.cfg.Sleep(ctx, r.e.cfg.PollInterval); err != nil {
			return nil, fmt.Errorf("waiting for open transactions: %w: %w", ErrStopped, err)
		}
		recs, err := r.e.cfg.Ownership.VMs(ctx, ids)
		if err != nil {
			return nil, fmt.Errorf("waiting for open transactions: %w", err)
		}
		r.mu.Lock()
		maps.Copy(r.recs, recs)
		r.mu.Unlock()
		open := slices.ContainsFunc(ids, func(id string) bool { return recs[id].OpenTx != "" })
		if !open || !r.e.cfg.Now().Before(deadline) {
			return recs, nil
		}
	}
}

// settle turns the Mover's answer into outcomes, takes a refused or
// failed destination out, and re-plans its VMs that did not move.
func (r *run) settle(ctx context.Context, b Batch, res BatchResult, err error) {
	src := r.e.cfg.Source
	var re *attest.RefusalError
	refused := errors.As(err, &re)
	down := !refused && errors.Is(err, ErrDestinationDown)
	stopped := r.stopping(ctx)
	var displaced []string
	for _, vm := range b.VMs {
		vr, ok := res.VMs[vm.ID]
		rep := VMReport{VM: vm.ID, Name: vm.Name, Dest: b.Dest, Bytes: vr.Bytes, ElapsedMS: vr.Elapsed.Milliseconds()}
		switch {
		case !ok && refused:
			displaced = append(displaced, vm.ID) // a refusal releases nothing: it still runs here
			continue
		case !ok:
			rep.Outcome, rep.TxID, rep.Detail = OutcomeOpen, b.TxID, "the mover gave no outcome"
			if err != nil {
				rep.Detail += ": " + err.Error()
			}
		case vr.Outcome == OutcomeMoved:
			rep.Outcome, rep.Host, rep.Generation = OutcomeMoved, b.Dest, vr.Generation
			r.mu.Lock()
			r.recs[vm.ID] = VMRecord{ID: vm.ID, Owner: b.Dest, Generation: vr.Generation}
			r.mu.Unlock()
		case vr.Outcome == OutcomeOpen:
			rep.Outcome, rep.TxID, rep.Detail = OutcomeOpen, b.TxID, vr.Err
		case (refused || down) && !stopped &&
			(vr.Outcome == OutcomeNotStarted || vr.Outcome == OutcomeFailed && vr.RunsOn == src):
			displaced = append(displaced, vm.ID)
			continue
		case vr.Outcome == OutcomeNotStarted && stopped:
			rep.Outcome, rep.Host, rep.Detail = OutcomeNotStarted, vr.RunsOn, "stopped before its migration"
		default: // failed, or not started for a reason of its own
			rep.Outcome, rep.Host, rep.Detail = OutcomeFailed, cmp.Or(vr.RunsOn, src), cmp.Or(vr.Err, errText(err))
		}
		r.finishVM(rep)
	}
	if refused || down {
		r.hostFailed(b.Dest, err, displaced)
	}
	if len(displaced) > 0 {
		if stopped {
			r.notStarted(displaced, b.Dest, "stopped; its destination was left out")
			return
		}
		r.replan(ctx, displaced)
	}
}

// stopping reports whether the operator stopped the run (the slots stop
// shortly after ctx ends; either says so).
func (r *run) stopping(ctx context.Context) bool { return ctx.Err() != nil || r.slots.Stopped() }

func errText(err error) string {
	if err == nil {
		return "the mover did not say why"
	}
	return err.Error()
}

// replan places VMs whose destination was left out on the hosts still
// eligible, keeping every other assignment (moved and in-flight VMs keep
// their place in the capacity snapshot), and starts one follow-up batch
// per destination that takes some.
func (r *run) replan(ctx context.Context, displaced []string) {
	r.mu.Lock()
	prior := map[string]string{}
	only := map[string]bool{}
	for _, id := range displaced {
		delete(r.assign, id)
		only[id] = true
	}
	for id, d := range r.assign {
		if _, out := r.excluded[d]; out {
			continue // on a host left out (it failed after they moved): they take no room elsewhere
		}
		prior[id], only[id] = d, true
	}
	p, err := r.makePlan(prior, only)
	if err != nil {
		r.mu.Unlock()
		r.failAll(displaced, "", fmt.Sprintf("re-plan: %v", err))
		return
	}
	by := map[string][]Assignment{}
	for _, a := range p.Assignments {
		if _, moved := prior[a.VM]; !moved {
			by[a.Dest] = append(by[a.Dest], a)
		}
	}
	for _, u := range p.Unplaced {
		if _, kept := prior[u.VM]; !kept {
			r.unplaced(u)
		}
	}
	dests := make([]string, 0, len(by))
	for d := range by {
		dests = append(dests, d)
	}
	slices.Sort(dests)
	for _, d := range dests {
		r.spawn(ctx, BatchPlan{Dest: d, VMs: by[d]})
	}
	r.mu.Unlock()
	r.e.log.WithField("vms", len(displaced)).Info("re-planned onto the remaining destinations")
	if err := r.saveRecord(ctx, StateRunning); err != nil {
		r.e.log.WithError(err).Error("could not save the re-planned evacuation")
	}
}

// finishVM records a VM's outcome in this run and emits vm-done.
func (r *run) finishVM(rep VMReport) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.finishLocked(rep)
}

// finishLocked is finishVM with r.mu held.
func (r *run) finishLocked(rep VMReport) {
	if _, done := r.results[rep.VM]; done {
		return
	}
	if rep.Name == "" {
		rep.Name = r.names[rep.VM]
	}
	r.results[rep.VM] = rep
	if rep.Outcome != OutcomeMoved && rep.Outcome != OutcomeOpen {
		delete(r.assign, rep.VM) // it takes no room on the destination
	}
	r.emit(Event{Type: EventVMDone, VM: rep.VM, Name: rep.Name, Dest: rep.Dest, Bytes: rep.Bytes,
		ElapsedMS: rep.ElapsedMS, Result: &rep})
}

func (r *run) failAll(ids []string, dest, why string) {
	for _, id := range ids {
		r.finishVM(VMReport{VM: id, Outcome: OutcomeFailed, Dest: dest, Host: r.e.cfg.Source, Detail: why})
	}
}

func (r *run) notStarted(ids []string, dest, why string) {
	for _, id := range ids {
		r.finishVM(VMReport{VM: id, Outcome: OutcomeNotStarted, Dest: dest, Host: r.e.cfg.Source, Detail: why})
	}
}

// phase emits a vm-phase event.
func (r *run) phase(vm, dest string, p Phase, bytes, total uint64, elapsed time.Duration, detail string) {
	r.mu.Lock()
	name := r.names[vm]
	r.mu.Unlock()
	r.emit(Event{Type: EventVMPhase, VM: vm, Name: name, Dest: dest, Phase: p, Bytes: bytes, Total: total,
		ElapsedMS: elapsed.Milliseconds(), Detail: detail})
}
