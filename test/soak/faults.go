package soak

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
)

// Faults: kills and restarts of a vtpmd, kills at a named crash point
// (of the host that reaches it or of its peer), cuts of a link pair now
// or at a crash point, and heals.

func drawCrash(s *Schedule) (Step, bool) {
	st, _ := drawMigrate(s)
	st.Kind, st.Point = "crash", migrate.CrashPoints[s.rng.IntN(len(migrate.CrashPoints))]
	st.Who = s.pick([]string{"self", "self", "peer"})
	st.Mode = s.pick([]string{"admin", "plain", "evacuate"})
	return st, true
}

func drawPartition(s *Schedule) (Step, bool) {
	st, _ := drawMigrate(s)
	st.Kind, st.Point = "partition", migrate.CrashPoints[s.rng.IntN(len(migrate.CrashPoints))]
	st.Mode = s.pick([]string{"admin", "plain", "evacuate"})
	who := []string{"wire"}
	switch s.cfg.Registry {
	case registry.ModeEtcd:
		who = append(who, "src-registry", "dst-registry")
	case registry.ModeEmbedded:
		who = append(who, "src-members", "dst-members")
	}
	st.Who, st.Cut = s.pick(who), s.pick([]string{LinkDrop.String(), LinkBlackhole.String()})
	return st, true
}

// atPoint arms st.Point on every running host for one migration (or,
// Mode evacuate, the evacuation of the host that runs the VM; dst is then
// the host Hop after it, a likely destination): the first host to reach
// it runs act(host, src, dst) there; act's error is the node's (an
// injected crash), nil lets it go on. It reports the host that reached
// the point ("" if none).
func (s *Schedule) atPoint(ctx context.Context, st Step, act func(at, src, dst string) error) (string, string) {
	src, dst := s.resolve(ctx, st)
	if src == "" {
		return "skipped: the VM runs on no single host", ""
	}
	var fired atomic.Pointer[string]
	for _, name := range s.upHosts() {
		s.f.InProcHost(name).OnCrashPoint(func(p migrate.CrashPoint) error {
			if p != st.Point || !fired.CompareAndSwap(nil, &name) {
				return nil
			}
			return act(name, src, dst)
		})
	}
	var out string
	if st.Mode == "evacuate" {
		out = runEvacuate(ctx, s, Step{Kind: "evacuate", Host: src})
	} else {
		out = s.migrate(ctx, st, src, dst)
	}
	for _, name := range Hosts {
		s.f.InProcHost(name).OnCrashPoint(nil)
	}
	if at := fired.Load(); at != nil {
		return out, *at
	}
	return out + "; the point was not reached", ""
}

// runCrash arms the crash point on every running host, runs the
// migration, and disarms: the first host to reach the point dies there
// (its vtpmd is killed, as a process dying at that step).
func runCrash(ctx context.Context, s *Schedule, st Step) string {
	var victim string
	out, at := s.atPoint(ctx, st, func(at, src, dst string) error {
		victim = at
		if st.Who == "peer" {
			victim = map[bool]string{true: dst, false: src}[at == src]
		}
		_ = s.f.InProcHost(victim).Kill(context.WithoutCancel(ctx))
		if victim == at {
			return fmt.Errorf("%w at %s (soak: %s dies)", migrate.ErrCrash, st.Point, at)
		}
		return nil // the peer dies; this host goes on
	})
	if at == "" {
		return out
	}
	s.down[victim] = true
	s.hist.Faults["crash-point-reached"]++
	return fmt.Sprintf("%s; %s reached the point, %s died", out, at, victim)
}

// runPartition cuts a link pair of the migration when the point is
// reached, and lets the migration go on; a later heal (or the end)
// restores it.
func runPartition(ctx context.Context, s *Schedule, st Step) string {
	var pair [2]string
	out, at := s.atPoint(ctx, st, func(_, src, dst string) error {
		pair = map[string][2]string{"wire": {src, dst}, "src-registry": {src, "registry"}, "dst-registry": {dst, "registry"},
			"src-members": {src, "members"}, "dst-members": {dst, "members"}}[st.Who]
		s.cut(pair[0], pair[1], st.Cut)
		return nil
	})
	if at == "" {
		return out
	}
	s.hist.Faults["cut-at-point-"+linkKind(pair[1])+"-"+st.Cut]++
	return fmt.Sprintf("%s; %s reached the point: %s<->%s cut (%s)", out, at, pair[0], pair[1], st.Cut)
}

func drawKill(s *Schedule) (Step, bool) {
	up := s.upHosts()
	if len(up) < 2 {
		return Step{}, false
	}
	return Step{Kind: "kill", Host: s.pick(up)}, true
}

func runKill(ctx context.Context, s *Schedule, st Step) string {
	s.down[st.Host] = true
	return outcome(s.f.InProcHost(st.Host).Kill(ctx), st.Host)
}

func drawRestart(s *Schedule) (Step, bool) {
	down := slices.DeleteFunc(s.downHosts(), func(h string) bool { return s.lost[h] != nil })
	if len(down) == 0 {
		return Step{}, false
	}
	return Step{Kind: "restart", Host: s.pick(down)}, true
}

func runRestart(ctx context.Context, s *Schedule, st Step) string {
	if err := s.f.InProcHost(st.Host).Restart(ctx); err != nil {
		return outcome(err, st.Host)
	}
	s.down[st.Host] = false
	return "ok"
}

// drawCut picks an up pair of parties (two hosts; in mode etcd a host
// and the registry: its links to every member; in mode embedded a host's
// member and the other members: its peer links both ways) and a state
// for it.
func drawCut(s *Schedule) (Step, bool) {
	var up [][2]string
	for i, a := range Hosts {
		var pairs [][2]string
		for _, b := range Hosts[i+1:] {
			pairs = append(pairs, [2]string{a, b})
		}
		switch s.cfg.Registry {
		case registry.ModeEtcd:
			pairs = append(pairs, [2]string{a, "registry"})
		case registry.ModeEmbedded:
			pairs = append(pairs, [2]string{a, "members"})
		}
		for _, p := range pairs {
			// any link up (a member's peer links overlap another's: after
			// one member is cut, cutting a second loses the quorum)
			if slices.ContainsFunc(s.pairLinks(p[0], p[1]), func(l *Link) bool { return l.State() == LinkUp }) {
				up = append(up, p)
			}
		}
	}
	if len(up) == 0 {
		return Step{}, false
	}
	p := up[s.rng.IntN(len(up))]
	return Step{Kind: "cut", Host: p[0], Peer: p[1], Cut: s.pick([]string{LinkDrop.String(), LinkBlackhole.String()})}, true
}

// pairLinks are the links of a pair: both directions between two hosts;
// a host's links to every registry member (a member dials no host); a
// host's member's peer links to and from every other member.
func (s *Schedule) pairLinks(a, b string) []*Link {
	var out []*Link
	for name, l := range s.links {
		from, to, _ := strings.Cut(name, ">")
		if (from == a && to == b) || (from == b && to == a) || (b == "registry" && from == a && strings.HasPrefix(to, "etcd-")) ||
			(b == "members" && strings.HasPrefix(to, "member:") && (from == a || to == "member:"+a)) {
			out = append(out, l)
		}
	}
	return out
}

func (s *Schedule) cut(a, b, state string) {
	st := LinkDrop
	if state == LinkBlackhole.String() {
		st = LinkBlackhole
	}
	for _, l := range s.pairLinks(a, b) {
		l.Set(st)
	}
}

func runCut(_ context.Context, s *Schedule, st Step) string {
	s.cut(st.Host, st.Peer, st.Cut)
	return "ok"
}

func drawHeal(s *Schedule) (Step, bool) {
	cut := s.cutLinks()
	if len(cut) == 0 {
		return Step{}, false
	}
	from, to, _ := strings.Cut(s.pick(cut), ">")
	switch {
	case strings.HasPrefix(to, "etcd-"):
		to = "registry"
	case strings.HasPrefix(to, "member:"):
		to = "members" // heals from's member's peer links
	case from > to:
		from, to = to, from
	}
	return Step{Kind: "heal", Host: from, Peer: to}, true
}

func runHeal(_ context.Context, s *Schedule, st Step) string {
	for _, l := range s.pairLinks(st.Host, st.Peer) {
		l.Set(LinkUp)
	}
	return "ok"
}
