package soak

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/vtpmm/vtpmm/test/fleet"
)

// admission is one host's start rule for one VM.
type admission struct {
	host string
	gen  uint64
	err  error
}

// admissions asks every running host's start rule (migrate.Node.CheckStart,
// what libvirt's prepare-begin hook and vtpmd's own starts ask) whether it
// would start vm now, all at once.
func (s *Schedule) admissions(ctx context.Context, vm fleet.VM) []admission {
	up := s.upHosts()
	out := make([]admission, len(up))
	var wg sync.WaitGroup
	for i, h := range up {
		wg.Go(func() {
			out[i].host = h
			d := s.f.InProcHost(h).Daemon()
			if d == nil {
				out[i].err = fmt.Errorf("not running")
				return
			}
			cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			defer cancel()
			out[i].gen, out[i].err = d.Node().CheckStart(cctx, vm.UUID)
		})
	}
	wg.Wait()
	return out
}

// checkStep checks the invariants that hold at every moment: at most one
// host admits each VM's start, no host admits a generation below one
// admitted before (anywhere), and each VM runs on at most one host.
func (s *Schedule) checkStep(ctx context.Context, step int) {
	for _, vm := range s.vms {
		var ok []string
		for _, a := range s.admissions(ctx, vm.VM) {
			if a.err != nil {
				continue
			}
			ok = append(ok, fmt.Sprintf("%s@%d", a.host, a.gen))
			if a.gen < s.maxGen[vm.UUID] {
				s.violate(step, "generation-backwards", fmt.Sprintf("%s: %s admits generation %d after %d was admitted", vm.Name, a.host, a.gen, s.maxGen[vm.UUID]))
			}
			s.maxGen[vm.UUID] = max(s.maxGen[vm.UUID], a.gen)
		}
		if len(ok) > 1 {
			s.violate(step, "two-starters", fmt.Sprintf("%s: %d hosts admit its start: %s", vm.Name, len(ok), strings.Join(ok, ", ")))
		}
		// The start rule can be right at every instant and the VM still
		// run twice (soak seed 4018: a host came back between its fence
		// agent and its fence record and started the VM): count the
		// running domains too, on every host, up or down.
		var running []string
		for _, h := range Hosts {
			if s.f.InProcHost(h).Running(ctx, vm.VM) {
				running = append(running, h)
			}
		}
		if len(running) > 1 {
			s.violate(step, "two-running", fmt.Sprintf("%s runs on %d hosts: %s", vm.Name, len(running), strings.Join(running, ", ")))
		}
	}
	s.readRegistry(ctx)
}

func (s *Schedule) violate(step int, rule, detail string) {
	s.hist.Violations = append(s.hist.Violations, Violation{Step: step, Rule: rule, Detail: detail})
	s.hist.add(step, "VIOLATION", rule, detail)
}

// finish heals every fault (links up, crash hooks off, every vtpmd
// restarted), lets recovery run until every VM has settled or the settle
// timeout passes, and checks the end state.
func (s *Schedule) finish(ctx context.Context) {
	step := s.cfg.Steps + 1
	for _, l := range s.links {
		l.Set(LinkUp)
	}
	for _, h := range Hosts {
		s.f.InProcHost(h).OnCrashPoint(nil)
	}
	s.noteFenced(step)
	for _, h := range s.downHosts() {
		if s.lost[h] != nil {
			continue // below, once the others run
		}
		var err error
		for range 3 {
			rctx, cancel := context.WithTimeout(ctx, s.cfg.OpTimeout)
			err = s.f.InProcHost(h).Restart(rctx)
			cancel()
			if err == nil {
				s.down[h] = false
				break
			}
		}
		s.hist.add(step, "heal", "restart "+h, outcome(err, h))
		if err != nil {
			s.violate(step, "restart", fmt.Sprintf("%s's vtpmd does not start again: %v", h, err))
		}
	}
	for _, h := range Hosts {
		if s.lost[h] == nil {
			continue
		}
		s.step = step
		out := s.recoverLost(ctx, h)
		s.hist.add(step, "heal", "restore "+h+"'s VMs, a new TPM", out)
		if s.lost[h] != nil {
			s.violate(step, "restart", fmt.Sprintf("%s does not come back on a new TPM: %s", h, out))
		}
	}
	t0 := time.Now()
	deadline := t0.Add(s.cfg.SettleTimeout)
	owners := map[string]string{}
	var last map[string]string
	for ctx.Err() == nil {
		s.restartFenced(ctx, step)
		for _, h := range s.upHosts() {
			_ = s.recoverHost(ctx, h)
		}
		last = map[string]string{}
		for _, vm := range s.vms {
			if _, ok := owners[vm.UUID]; ok {
				continue
			}
			s.haStart(ctx, step, vm)
			octx, cancel := context.WithTimeout(ctx, 30*time.Second)
			owner, report, err := fleet.Owner(octx, s.f, vm.VM)
			cancel()
			if err == nil {
				owners[vm.UUID] = owner
			} else {
				last[vm.Name] = err.Error() + "\n" + report + s.registryLine(ctx, vm)
			}
		}
		if len(last) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(2 * time.Second)
	}
	s.hist.Settle = time.Since(t0)
	s.hist.add(step, "settle", fmt.Sprintf("recovery for %v", s.hist.Settle.Round(time.Millisecond)), fmt.Sprintf("%d of %d VMs settled", len(owners), len(s.vms)))
	names := make([]string, 0, len(last))
	for n := range last {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		s.violate(step, "not-settled", fmt.Sprintf("%s has no single owner after recovery: %s", n, last[n]))
	}
	for _, vm := range s.vms {
		owner, ok := owners[vm.UUID]
		if !ok {
			continue
		}
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		secret, err := s.f.InProcHost(owner).TenantSecret(sctx, vm.VM)
		cancel()
		if err != nil || secret != vm.secret {
			s.violate(step, "lost-vtpm", fmt.Sprintf("%s on %s: the tenant unseals %q (%v), not the secret sealed at creation", vm.Name, owner, secret, err))
		}
		var admit []string
		for _, a := range s.admissions(ctx, vm.VM) {
			if a.err == nil {
				admit = append(admit, a.host)
			}
		}
		if len(admit) != 1 || admit[0] != owner {
			s.violate(step, "start-rule", fmt.Sprintf("%s is owned by %s, but the start rule admits it on %v", vm.Name, owner, admit))
		}
		s.hist.add(step, "end", vm.Name, fmt.Sprintf("owned by %s", owner))
	}
	s.checkStep(ctx, step)
	s.checkLinearizable(step)
}

// registryLine is the registry's record of vm, for a violation's report
// (soak seed 5003's report showed the hosts but not the record).
func (s *Schedule) registryLine(ctx context.Context, vm soakVM) string {
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	v, err := s.f.Operator().VMs(rctx, vm.UUID)
	if err != nil {
		return fmt.Sprintf("registry: %v\n", err)
	}
	r, ok := v.VMs[vm.UUID]
	if !ok {
		return "registry: no record\n"
	}
	tx := ""
	if r.Tx != nil {
		tx = r.Tx.ID + " to " + r.Tx.To
	}
	return fmt.Sprintf("registry: owner=%s generation=%d tx=%q\n", r.Owner, r.Generation, tx)
}
