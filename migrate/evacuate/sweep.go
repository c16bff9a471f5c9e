package evacuate

import (
	"context"
	"fmt"
	"maps"
	"slices"
)

// maxSweeps bounds the final sweeps of a run (below).
const maxSweeps = 3

// sweep is the run's last look before it reports: the inventory was taken
// at the start, and a VM can arrive on the source during the run, above
// all a failover that promoted a replica here while the draining mark was
// being set (a promotion checks the mark, rule draining, but the check and
// its compare-and-swap are two steps). sweep reads the source's hypervisor
// and the records of its VMs again (one read each) and moves every VM that
// runs here, is owned by the source and has no result yet, or was skipped
// as not running and runs now, through the same plan and batches as the
// others. It repeats while VMs arrive, at most maxSweeps times; a VM that
// arrived after the last sweep is reported failed (run the evacuation
// again), never left unreported behind an exit code of 0.
func (r *run) sweep(ctx context.Context) {
	src := r.e.cfg.Source
	for i := 0; ; i++ {
		if r.stopping(ctx) || r.lost {
			return
		}
		arrived, err := r.arrivals(ctx)
		if err != nil {
			r.e.log.WithError(err).Warn("final sweep: could not read the source's VMs again")
			return
		}
		if len(arrived) == 0 {
			return
		}
		ids := slices.Sorted(maps.Keys(arrived))
		if i == maxSweeps {
			for _, id := range ids {
				r.finishVM(VMReport{VM: id, Name: arrived[id].Name, Outcome: OutcomeFailed, Host: src,
					Detail: fmt.Sprintf("arrived on %s during the evacuation (a failover?) after its last sweep: run the evacuation again", src)})
			}
			return
		}
		r.e.log.WithField("vms", len(ids)).Warn("final sweep: VMs arrived on the source during the evacuation; moving them too")
		r.mu.Lock()
		for _, id := range ids {
			r.vms[id], r.names[id] = arrived[id], arrived[id].Name
			delete(r.results, id) // skipped as not running before: it runs now
		}
		r.mu.Unlock()
		r.replan(ctx, ids)
		r.wg.Wait()
	}
}

// arrivals returns the VMs that run on the source, are owned by it with no
// transaction open, and are not done in this run (no result, or skipped
// as not running).
func (r *run) arrivals(ctx context.Context) (map[string]VM, error) {
	src := r.e.cfg.Source
	inv, err := r.e.cfg.Inventory.VMs(ctx)
	if err != nil {
		return nil, err
	}
	var ids []string
	running := map[string]VM{}
	r.mu.Lock()
	for _, vm := range inv {
		if !vm.Running {
			continue
		}
		if res, done := r.results[vm.ID]; done && !(res.Outcome == OutcomeSkipped && res.Host == src && res.Dest == "") {
			continue
		}
		if _, inScope := r.vms[vm.ID]; inScope {
			if _, done := r.results[vm.ID]; !done {
				continue // planned and not reported: its batch reports it
			}
		}
		running[vm.ID] = vm
		ids = append(ids, vm.ID)
	}
	r.mu.Unlock()
	if len(ids) == 0 {
		return nil, nil
	}
	slices.Sort(ids)
	recs, err := r.e.cfg.Ownership.VMs(ctx, ids)
	if err != nil {
		return nil, err
	}
	out := map[string]VM{}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, id := range ids {
		rec, ok := recs[id]
		if !ok || rec.Owner != src || rec.OpenTx != "" {
			continue // not the source's to move (or recovery's first)
		}
		r.recs[id] = rec
		out[id] = running[id]
	}
	return out, nil
}
