package soak

import (
	"context"
	"fmt"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
)

// The operator's failover (failover schedules): the operator powers the
// host that runs a VM off and runs, on a standby, 'vtpmctl failover VM
// --to STANDBY --confirm-fenced OLD' (adminapi.FailoverRequest through
// that standby's admin API, as vtpmctl does). The daemons' automatic
// failover may race it: one compare-and-swap decides.

func drawOpFailover(s *Schedule) (Step, bool) {
	if !s.cfg.Failover || len(s.upHosts()) < 2 {
		return Step{}, false
	}
	return Step{Kind: "op-failover", VM: s.rng.IntN(len(s.vms))}, true
}

// runOpFailover powers the VM's host off once a live standby holds a
// replica at the owner's generation (up to 30 s), then asks that standby
// to take the VM over, confirming the old host fenced.
func runOpFailover(ctx context.Context, s *Schedule, st Step) string {
	vm := s.vms[st.VM]
	src := s.runningOn(ctx, vm.VM)
	if src == "" || s.down[src] {
		return "skipped: the VM runs on no single live host"
	}
	to := ""
	for end := time.Now().Add(30 * time.Second); to == "" && time.Now().Before(end) && ctx.Err() == nil; {
		if to = s.readyStandby(ctx, vm.UUID, src); to == "" {
			time.Sleep(500 * time.Millisecond)
		}
	}
	if to == "" {
		return "skipped: no live standby had a current replica within 30 s"
	}
	owner0, _ := s.recordOf(ctx, vm.UUID, src)
	call := s.lin.now()
	if err := s.powerOff(ctx, src); err != nil {
		return outcome(err, "power off "+src)
	}
	rep, err := s.f.InProcHost(to).Admin().Failover(ctx, adminapi.FailoverRequest{VM: vm.UUID, To: to, ConfirmFenced: []string{src}})
	if err != nil {
		// Refused (another standby won, stale replica) or unknown: the
		// record may have moved from its owner anyway (the daemons'
		// failover).
		s.lin.add(regInput{VM: vm.UUID, From: owner0}, regOutput{}, call, call)
		return fmt.Sprintf("power off %s; failover --to %s --confirm-fenced %s: %s", src, to, src, outcome(err, to))
	}
	s.lin.add(regInput{VM: vm.UUID, From: rep.From, To: to}, regOutput{Known: true}, call, s.lin.now())
	s.hist.Faults["operator-failover-promoted"]++
	return fmt.Sprintf("power off %s; failover --to %s --confirm-fenced %s: promoted from %s at generation %d, started %v", src, to, src, rep.From, rep.Generation, rep.Started)
}

// powerOff powers host off as an operator does before confirming it
// fenced: its running domains destroyed, its vtpmd killed (Fleet.Fence
// without counting a fence agent's run).
func (s *Schedule) powerOff(ctx context.Context, host string) error {
	h := s.f.InProcHost(host)
	if err := h.Fake().PowerCycle(ctx); err != nil {
		return err
	}
	s.down[host] = true
	return h.Kill(ctx)
}
