package soak

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/evacuate"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/operator"
)

// Step is one drawn op with its arguments.
type Step struct {
	Kind  string
	VM    int    // index into the schedule's VMs
	Host  string // the host acted on (kill, restart, evacuate; a link's one end)
	Peer  string // a link's other end
	Hop   int    // a migration's destination: Hop hosts after the one that runs the VM (Hosts order)
	Mode  string // a migration's path (admin, plain); a cut's state
	Point migrate.CrashPoint
	// Hop2 and Mode2 are a race's second migration.
	Hop2  int
	Mode2 string
	// Who is what a crash point does: kill the host that reached it
	// (self) or its peer in the migration (peer), or cut the agent wire
	// between the two (wire), or the source's or the destination's
	// links to the registry (src-registry, dst-registry); Cut is the
	// cut's state.
	Who, Cut string
}

func (st Step) String() string {
	var b strings.Builder
	b.WriteString(st.Kind)
	if st.Kind == "migrate" || st.Kind == "crash" || st.Kind == "partition" {
		fmt.Fprintf(&b, " soak-%d -> +%d (%s)", st.VM+1, st.Hop, st.Mode)
	}
	if st.Kind == "failover" || st.Kind == "op-failover" || st.Kind == "restore" {
		fmt.Fprintf(&b, " soak-%d", st.VM+1)
	}
	if st.Kind == "race" {
		fmt.Fprintf(&b, " soak-%d -> +%d (%s) || -> +%d (%s)", st.VM+1, st.Hop, st.Mode, st.Hop2, st.Mode2)
	}
	if st.Point != "" {
		fmt.Fprintf(&b, " at %s: %s", st.Point, st.Who)
	}
	switch st.Kind {
	case "kill", "restart", "evacuate":
		b.WriteString(" " + st.Host)
	case "cut", "heal":
		fmt.Fprintf(&b, " %s<->%s", st.Host, st.Peer)
	}
	if st.Cut != "" {
		fmt.Fprintf(&b, " (%s)", st.Cut)
	}
	return b.String()
}

// OpKind is one entry of the op table: how to draw it from the
// schedule's state (false: not applicable now) and how to run it. An
// outcome is "ok" or what failed; a fault counts in the table by Fault.
type OpKind struct {
	Name   string
	Weight int
	// Failover: drawn only in failover schedules (Config.Failover).
	Failover bool
	Fault    func(Step) string // the fault's kind for the table ("" if none)
	Draw     func(s *Schedule) (Step, bool)
	Run      func(ctx context.Context, s *Schedule, st Step) string
}

// Ops is the op table. Entries marked Failover are drawn only in
// failover schedules, so the others draw the same steps from a seed.
var Ops = []OpKind{
	{Name: "migrate", Weight: 6, Draw: drawMigrate, Run: runMigrate},
	{Name: "race", Weight: 2, Draw: drawRace, Run: runRace},
	{Name: "evacuate", Weight: 1, Draw: drawEvacuate, Run: runEvacuate},
	{Name: "crash", Weight: 4, Fault: func(st Step) string { return "crash-point-armed" }, Draw: drawCrash, Run: runCrash},
	{Name: "partition", Weight: 3, Fault: func(st Step) string { return "cut-at-point-armed" }, Draw: drawPartition, Run: runPartition},
	{Name: "kill", Weight: 1, Fault: func(Step) string { return "kill" }, Draw: drawKill, Run: runKill},
	{Name: "restart", Weight: 4, Draw: drawRestart, Run: runRestart},
	{Name: "cut", Weight: 3, Fault: func(st Step) string { return "cut-" + linkKind(st.Peer) + "-" + st.Cut }, Draw: drawCut, Run: runCut},
	{Name: "heal", Weight: 3, Draw: drawHeal, Run: runHeal},
	{Name: "recover", Weight: 1, Draw: func(*Schedule) (Step, bool) { return Step{Kind: "recover"}, true }, Run: runRecover},
	{Name: "failover", Weight: 2, Failover: true, Fault: func(Step) string { return "owner-crash" }, Draw: drawFailover, Run: runFailover},
	{Name: "restore", Weight: 1, Draw: drawRestore, Run: runRestore},
	{Name: "op-failover", Weight: 1, Failover: true, Fault: func(Step) string { return "owner-poweroff" }, Draw: drawOpFailover, Run: runOpFailover},
}

func linkKind(peer string) string {
	if peer == "registry" || peer == "members" {
		return peer
	}
	return "wire"
}

// draw picks the next step by weight among the applicable ops.
func (s *Schedule) draw(step int) Step {
	skip := func(k OpKind) bool {
		if step <= len(s.cfg.First) {
			return k.Name != s.cfg.First[step-1]
		}
		return (k.Failover && !s.cfg.Failover) || (len(s.cfg.Only) > 0 && !slices.Contains(s.cfg.Only, k.Name))
	}
	for {
		total := 0
		for _, k := range Ops {
			if !skip(k) {
				total += k.Weight
			}
		}
		n := s.rng.IntN(total)
		for _, k := range Ops {
			if skip(k) {
				continue
			}
			if n -= k.Weight; n < 0 {
				if st, ok := k.Draw(s); ok {
					return st
				}
				break
			}
		}
	}
}

func (s *Schedule) kind(name string) OpKind {
	for _, k := range Ops {
		if k.Name == name {
			return k
		}
	}
	panic("soak: no op " + name)
}

// run runs st within the op timeout and counts its fault.
func (s *Schedule) run(ctx context.Context, st Step) string {
	k := s.kind(st.Kind)
	if k.Fault != nil {
		s.hist.Faults[k.Fault(st)]++
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.OpTimeout)
	defer cancel()
	return k.Run(ctx, s, st)
}

func (s *Schedule) pick(from []string) string { return from[s.rng.IntN(len(from))] }

func drawMigrate(s *Schedule) (Step, bool) {
	return Step{Kind: "migrate", VM: s.rng.IntN(len(s.vms)), Hop: 1 + s.rng.IntN(len(Hosts)-1), Mode: s.pick([]string{"admin", "plain"})}, true
}

func drawRace(s *Schedule) (Step, bool) {
	st, _ := drawMigrate(s)
	st.Kind, st.Hop2, st.Mode2 = "race", 1+s.rng.IntN(len(Hosts)-1), s.pick([]string{"admin", "plain"})
	return st, true
}

// runRace runs two migrations of the same VM at once (two operators, or
// an operator and a tool on the hypervisor).
func runRace(ctx context.Context, s *Schedule, st Step) string {
	var out [2]string
	var wg sync.WaitGroup
	for i, m := range []Step{{VM: st.VM, Hop: st.Hop, Mode: st.Mode}, {VM: st.VM, Hop: st.Hop2, Mode: st.Mode2}} {
		wg.Go(func() { out[i] = runMigrate(ctx, s, m) })
	}
	wg.Wait()
	return out[0] + " || " + out[1]
}

// runMigrate migrates a VM from the host that runs it: 'vtpmctl migrate'
// through that host's admin API, or a plain hypervisor migration whose
// hooks move the key.
func runMigrate(ctx context.Context, s *Schedule, st Step) string {
	src, dst := s.resolve(ctx, st)
	if src == "" {
		return "skipped: the VM runs on no single host"
	}
	return s.migrate(ctx, st, src, dst)
}

// resolve names a migration's source (the host that runs the VM now; ""
// if none or several) and destination (Hop hosts after it).
func (s *Schedule) resolve(ctx context.Context, st Step) (src, dst string) {
	src = s.runningOn(ctx, s.vms[st.VM].VM)
	if src == "" {
		return "", ""
	}
	return src, Hosts[(slices.Index(Hosts, src)+st.Hop)%len(Hosts)]
}

// migrate runs one migration and records it as a move of the VM's
// record (linearize.go): known when vtpmctl migrate reports it committed.
func (s *Schedule) migrate(ctx context.Context, st Step, src, dst string) string {
	vm, via, h := s.vms[st.VM], src+"->"+dst, s.f.InProcHost(src)
	call := s.lin.now()
	known, err := false, error(nil)
	if st.Mode == "plain" {
		err = h.PlainMigrate(ctx, vm.VM, dst) // the key settles after it returns
	} else {
		var end adminapi.MigrateEvent
		end, err = h.Admin().Migrate(ctx, adminapi.MigrateRequest{VMs: []string{vm.UUID}, To: dst}, nil)
		if err == nil {
			err = end.Err()
		}
		known = err == nil && end.Result != nil && slices.Contains(end.Result.Committed, vm.UUID)
	}
	s.lin.add(regInput{VM: vm.UUID, From: src, To: dst}, regOutput{Known: known}, call, s.lin.now())
	return outcome(err, via)
}

func outcome(err error, what string) string {
	if err == nil {
		return what + " ok"
	}
	msg := err.Error()
	if len(msg) > 400 {
		msg = msg[:400] + "..."
	}
	return what + " failed: " + msg
}

func drawEvacuate(s *Schedule) (Step, bool) {
	up := s.upHosts()
	if len(up) < 2 {
		return Step{}, false
	}
	return Step{Kind: "evacuate", Host: s.pick(up)}, true
}

// runEvacuate runs 'vtpmctl evacuate HOST' (the operator's drain, then
// the host's vtpmd) and 'undrain' after it, so the host takes VMs again.
func runEvacuate(ctx context.Context, s *Schedule, st Step) string {
	var rep *evacuate.Report
	call := s.lin.now()
	end, err := operator.Evacuate(ctx, s.f.Operator(), s.f.InProcHost(st.Host).Admin(), adminapi.EvacuateRequest{Host: st.Host},
		func(line []byte) error {
			var ev evacuate.Event
			if json.Unmarshal(line, &ev) == nil && ev.Type == evacuate.EventReport {
				rep = ev.Report
			}
			return nil
		})
	s.recordEvacuation(st.Host, rep, call)
	if end.ExitCode == evacuate.ExitOK && err == nil && rep != nil {
		// Exit 0 says every VM left the source: one still running there
		// must at least be in the report (skipped, with its reason).
		for _, vm := range s.vms {
			if s.runningOn(ctx, vm.VM) == st.Host && !slices.ContainsFunc(rep.VMs, func(v evacuate.VMReport) bool { return v.VM == vm.UUID }) {
				s.violate(s.step, "evacuation-report", fmt.Sprintf("evacuate %s exited 0 (every VM left), but %s still runs there and the report does not name it", st.Host, vm.Name))
			}
		}
	}
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	uerr := s.f.Operator().SetState(uctx, st.Host, registry.StateActive)
	if err != nil {
		return outcome(err, "evacuate "+st.Host)
	}
	out := fmt.Sprintf("exit %d", end.ExitCode)
	if end.Error != "" {
		out += " (" + end.Error + ")"
	}
	if rep != nil {
		out += fmt.Sprintf(" %v resumed=%v", rep.Counts, rep.Resumed)
		for _, v := range rep.VMs {
			out += fmt.Sprintf("; %s %s->%s %s %s", v.Name, v.Outcome, v.Host, v.Rule, v.Detail)
		}
	}
	if uerr != nil {
		out += "; undrain: " + uerr.Error()
	}
	return out
}

// recordEvacuation records a move of every VM on host: known for those
// the report says this run moved, unknown for the others (an evacuation
// cut short may have moved any of them, or may still).
func (s *Schedule) recordEvacuation(host string, rep *evacuate.Report, call int64) {
	ret := s.lin.now()
	reported := map[string]evacuate.VMReport{}
	if rep != nil {
		for _, v := range rep.VMs {
			reported[v.VM] = v
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, vm := range s.vms {
		v, ok := reported[vm.UUID]
		if !ok && s.runningOn(ctx, vm.VM) != host {
			continue
		}
		in := regInput{VM: vm.UUID, From: host} // unknown: to any host (a re-plan may change it)
		known := ok && v.Outcome == evacuate.OutcomeMoved && !v.Earlier && v.Host != ""
		if known {
			in.To = v.Host
		}
		s.lin.add(in, regOutput{Known: known}, call, ret)
	}
}

// runRecover runs every running host's recovery as its tick does
// (Reconcile, then the ownership sync), instead of waiting for it.
func runRecover(ctx context.Context, s *Schedule, _ Step) string {
	var errs []string
	for _, h := range s.upHosts() {
		if err := s.recoverHost(ctx, h); err != nil {
			errs = append(errs, h+": "+err.Error())
		}
	}
	if len(errs) == 0 {
		return "ok"
	}
	return outcome(fmt.Errorf("%s", strings.Join(errs, "; ")), "recovery")
}

func (s *Schedule) recoverHost(ctx context.Context, h string) error {
	d := s.f.InProcHost(h).Daemon()
	if d == nil {
		return fmt.Errorf("not running")
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := d.Node().Reconcile(ctx); err != nil {
		return err
	}
	_, rerr := d.Node().Reunite(ctx)
	_, err := d.Node().SyncOwnership(ctx)
	return errors.Join(rerr, err)
}
