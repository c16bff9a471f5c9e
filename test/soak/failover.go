package soak

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Failover schedules (Config.Failover, issue #15): every VM has the two
// other hosts as standbys, the daemons fail over automatically (lease
// expiry, the fleet's fence agent, one compare-and-swap), and the op
// "failover" crashes the host that runs a VM (Host.Crash: its lease is
// left to expire) and waits for a standby to promote.
//
// A failover changes the registry's record without a move the harness
// asked for, after any fault that takes an owner's lease away (a crash,
// a kill, a registry cut, a fence). So, in failover schedules, before a
// step that injects a fault, or while a VM's owner is down or has a link
// cut, the VM gets an unknown move from its owner at the last read to
// any other host (a failover that may happen from then on); the failover
// op adds a known move when it sees the promotion. The record may still
// change only by one generation per move, from the owner the move names.

// faultOps are the ops that may take an owner's lease away.
var faultOps = []string{"crash", "partition", "kill", "cut", "failover", "op-failover", "restore"}

// mayFailOver records, in failover schedules, that a VM may fail over
// from its last-read owner from now on, when st injects a fault or the
// owner is down or has a link cut.
func (s *Schedule) mayFailOver(st Step) {
	if !s.cfg.Failover {
		return
	}
	call := s.lin.now()
	cut := s.cutLinks()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, vm := range s.vms {
		o := s.regOwner[vm.UUID]
		if o == "" {
			continue
		}
		// The last-read owner, or any host a recorded move named as the
		// destination (a move whose key settled after its op returned may
		// have taken effect since that read: soak seed 9009).
		owners := []string{o}
		for _, h := range s.lin.movedTo(vm.UUID) {
			if !slices.Contains(owners, h) {
				owners = append(owners, h)
			}
		}
		for _, h := range owners {
			if slices.Contains(faultOps, st.Kind) || s.down[h] || slices.ContainsFunc(cut, func(l string) bool {
				from, to, _ := strings.Cut(l, ">")
				return from == h || strings.TrimPrefix(to, "member:") == h
			}) {
				s.lin.add(regInput{VM: vm.UUID, From: h}, regOutput{}, call, call)
			}
		}
	}
}

// noteFenced marks the hosts the fence agent powered off during a step
// as down (the restart op and the final heal restart them).
func (s *Schedule) noteFenced(step int) {
	if !s.cfg.Failover {
		return
	}
	for _, h := range Hosts {
		if !s.down[h] && !s.f.InProcHost(h).Up() {
			s.down[h] = true
			s.hist.add(step, "fenced", h, fmt.Sprintf("vtpmd down (fence agent runs: %d)", s.f.Fenced(h)))
		}
	}
}

func drawFailover(s *Schedule) (Step, bool) {
	if !s.cfg.Failover || len(s.upHosts()) < 2 {
		return Step{}, false
	}
	return Step{Kind: "failover", VM: s.rng.IntN(len(s.vms))}, true
}

// runFailover crashes the host that runs the VM, once a live standby
// holds a replica at the owner's generation (up to 30 s), and waits up
// to 90 s for a standby to promote (the registry names another owner).
func runFailover(ctx context.Context, s *Schedule, st Step) string {
	vm := s.vms[st.VM]
	src := s.runningOn(ctx, vm.VM)
	if src == "" || s.down[src] {
		return "skipped: the VM runs on no single live host"
	}
	ready := ""
	for end := time.Now().Add(30 * time.Second); ready == "" && time.Now().Before(end) && ctx.Err() == nil; {
		ready = s.readyStandby(ctx, vm.UUID, src)
		if ready == "" {
			time.Sleep(500 * time.Millisecond)
		}
	}
	owner0, gen0 := s.recordOf(ctx, vm.UUID, src)
	call := s.lin.now()
	if err := s.f.InProcHost(src).Crash(ctx); err != nil {
		return outcome(err, "crash "+src)
	}
	s.down[src] = true
	out := "crash " + src
	if ready == "" {
		out += " (no live standby had a current replica)"
	}
	owner, gen := "", uint64(0)
	for end := time.Now().Add(90 * time.Second); time.Now().Before(end) && ctx.Err() == nil; time.Sleep(250 * time.Millisecond) {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		v, err := s.f.Operator().VMs(rctx, vm.UUID)
		cancel()
		if err == nil && !v.Stale {
			if r, ok := v.VMs[vm.UUID]; ok && r.Owner != src && r.Owner != "" && r.Generation > gen0 {
				owner, gen = r.Owner, r.Generation
				break
			}
		}
	}
	if owner == "" {
		s.lin.add(regInput{VM: vm.UUID, From: owner0}, regOutput{}, call, call)
		return out + "; no standby promoted within 90 s"
	}
	if gen == gen0+1 {
		s.lin.add(regInput{VM: vm.UUID, From: owner0, To: owner}, regOutput{Known: true}, call, s.lin.now())
	} else {
		// More than one change (an unsettled migration to src committed,
		// then the promotion from src): the promotion's own is unknown.
		s.lin.add(regInput{VM: vm.UUID, From: src, To: owner}, regOutput{}, call, call)
	}
	s.hist.Faults["failover-promoted"]++
	return fmt.Sprintf("%s; %s promoted at generation %d (fence agent runs for %s: %d)", out, owner, gen, src, s.f.Fenced(src))
}

// readyStandby is a live standby of vm whose record is at the owner's
// generation ("" if none).
func (s *Schedule) readyStandby(ctx context.Context, vm, owner string) string {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	v, err := s.f.Operator().VMs(ctx, vm)
	if err != nil {
		return ""
	}
	r, ok := v.VMs[vm]
	if !ok || r.Owner != owner {
		return ""
	}
	sbs, err := s.f.Operator().Standbys(ctx, vm)
	if err != nil {
		return ""
	}
	for _, sb := range sbs {
		if sb.Generation == r.Generation && !s.down[sb.Host] && slices.Contains(Hosts, sb.Host) {
			return sb.Host
		}
	}
	return ""
}

// haStart, in failover schedules at the end, starts a VM that runs
// nowhere on its registry owner, as the cloud's HA manager does for the
// VMs of a host the fence agent powered off that no standby took over.
// The start goes through the hypervisor's prepare hook, so the owner's
// start rule decides; any other host would be refused.
func (s *Schedule) haStart(ctx context.Context, step int, vm soakVM) {
	if !s.cfg.Failover || s.runningOn(ctx, vm.VM) != "" {
		return
	}
	for _, h := range Hosts {
		if s.f.InProcHost(h).Running(ctx, vm.VM) {
			return // on several hosts: not the HA manager's case
		}
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	v, err := s.f.Operator().VMs(rctx, vm.UUID)
	r, ok := v.VMs[vm.UUID]
	var skip string
	switch {
	case err != nil:
		skip = "the registry: " + err.Error()
	case !ok || r.Owner == "":
		skip = "the registry has no owner"
	case s.down[r.Owner]:
		skip = "its owner " + r.Owner + " is down"
	case r.Tx != nil:
		skip = fmt.Sprintf("the registry shows %s at generation %d with migration %s to %s open", r.Owner, r.Generation, r.Tx.ID, r.Tx.To)
	}
	if s.haTried == nil {
		s.haTried = map[string]string{}
	}
	if skip != "" {
		// Each distinct reason once (soak seed 5003: a VM the HA start
		// never tried left no trace of why).
		if s.haTried[vm.UUID] != "skip: "+skip {
			s.hist.add(step, "ha-start", vm.Name, "skipped: "+skip)
		}
		s.haTried[vm.UUID] = "skip: " + skip
		return
	}
	err = s.f.InProcHost(r.Owner).Fake().StartDomain(rctx, vm.UUID)
	if err == nil || s.haTried[vm.UUID] != "tried" { // the first refusal and the start; retried every 2 s
		s.hist.add(step, "ha-start", vm.Name+" on "+r.Owner, outcome(err, r.Owner))
	}
	s.haTried[vm.UUID] = "tried"
}

// restartFenced, in failover schedules at the end, restarts a vtpmd the
// fence agent powered off after the last step (a lease lost to a cut of
// that step expires later).
func (s *Schedule) restartFenced(ctx context.Context, step int) {
	if !s.cfg.Failover {
		return
	}
	for _, h := range Hosts {
		if s.f.InProcHost(h).Up() || s.lost[h] != nil {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, s.cfg.OpTimeout)
		err := s.f.InProcHost(h).Restart(rctx)
		cancel()
		s.hist.add(step, "heal", "restart "+h+" (fenced)", outcome(err, h))
		if err == nil {
			s.down[h] = false
		}
	}
}

// recordOf reads vm's record (the operator's linearizable read): its owner
// and generation; host and 0 when it cannot be read. The VM may run on a
// host that does not own it yet (a plain migration whose key has not
// settled): a failover moves the record from its owner, not from there.
func (s *Schedule) recordOf(ctx context.Context, vm, host string) (string, uint64) {
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	v, err := s.f.Operator().VMs(rctx, vm)
	if err != nil || v.Stale {
		return host, 0
	}
	r, ok := v.VMs[vm]
	if !ok || r.Owner == "" {
		return host, 0
	}
	return r.Owner, r.Generation
}
