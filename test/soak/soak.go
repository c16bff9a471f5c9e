// Package soak runs randomized fault schedules on the real code (issue
// #16, item 3): an in-process fleet (test/fleet/inproc: real vtpmd
// daemons, real swtpm host TPMs and vTPMs, real embedded etcd, the fake
// hypervisor in hook mode) driven through a schedule drawn from a seed:
// migrations through the admin API (as vtpmctl) and through the
// hypervisor alone (the hook pulls the key), evacuations, kills and
// restarts of any vtpmd, crashes at the migration state machine's named
// crash points, and network cuts on every link between two parties (the
// agent wire between two hosts, a host and each registry member) through
// loopback proxies (link.go) that drop or blackhole.
//
// After every step it checks the invariants (check.go): at most one host
// admits each VM's start and the generation admitted never goes
// backwards; at the end, after healing every fault and letting recovery
// run, every VM is owned by exactly one host that runs it, holds its key
// and unseals the tenant's secret sealed at creation, with nothing
// pending and the registry agreeing. Ops and faults are a table (ops.go);
// failover schedules (failover.go) add standbys, the fence agent and the
// failover op.
//
// A schedule is replayed from its seed: the seed fixes every random
// choice; the real code's timing may still make a replay's outcomes
// differ, and the history records both. docs/soak.md has the details.
package soak

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// Config is one schedule.
type Config struct {
	Seed  uint64
	Steps int // ops drawn (0: 12; < 0: none)
	VMs   int // VMs created on the first host (default 3)
	// Registry is the fleet registry's mode: etcd (an external cluster:
	// host<->registry links can be cut) or embedded (a member in every
	// vtpmd: a kill takes its member down). Empty: drawn from the seed.
	Registry registry.Mode
	// OpTimeout bounds one op (default 2 min); SettleTimeout the final
	// recovery (default 3 min).
	OpTimeout, SettleTimeout time.Duration
	// Failover gives every VM two standbys (the other hosts), runs the
	// fleet's fence agent with automatic failover, and adds the failover
	// op to the table (failover.go).
	Failover bool
	// Only, when set, restricts the draws to the ops named (a replay that
	// exercises one op; the seed's draws differ from the full table's).
	Only []string
	// First, when set, are the ops of the first steps, in order (their
	// arguments drawn as usual; an op that does not apply is drawn again).
	First []string
	// Log, when set, receives the history as it is written.
	Log func(string)
	// DaemonLogs, when set, is a directory where each host's vtpmd logs
	// (JSON, appended across restarts) go, one file per seed and host:
	// what a violation's history does not say.
	DaemonLogs string
	// Mutate, when set, breaks the fleet after its set-up (tests that
	// prove a check can fail).
	Mutate func(ctx context.Context, f *inproc.Fleet, vms []fleet.VM) error
}

// Hosts of every soak fleet: all trusted.
var Hosts = []string{fleet.HostA, fleet.HostB, fleet.HostC}

// Schedule is a running schedule: its fleet, its links, what the
// harness knows of the hosts and the VMs, and its history.
type Schedule struct {
	cfg Config
	// logs are the hosts' vtpmd loggers (Config.DaemonLogs), one file
	// each for the schedule, closed when it ends.
	logMu sync.Mutex
	logs  map[string]logrus.FieldLogger
	files []*os.File
	rng   *rand.Rand
	f     *inproc.Fleet
	links map[string]*Link // "from>to" (to: a host, etcd-N, or member:HOST)
	// peers are the fronts between the members (mode embedded): a
	// member's peer links are in links as "A>member:B".
	peers *PeerLinks
	vms   []soakVM

	mu     sync.Mutex
	listen map[string]string // host -> its real agent wire address

	step   int             // the step running
	down   map[string]bool // vtpmd killed and not restarted
	maxGen map[string]uint64
	hist   *History
	// regOwner is each VM's owner at the registry's last read.
	regOwner map[string]string
	haTried  map[string]string // per VM, what haStart last did: "tried", or "skip: " and why
	// lost are the hosts that lost their TPM (restore op) and are not
	// back on a new one: Restart cannot bring them back.
	lost       map[string]*lostHost
	custodians *custodians // the restore op's backups
	lin        *linHistory
	started    time.Time
}

type soakVM struct {
	fleet.VM
	secret string
}

// Run runs one schedule end to end: the fleet, the steps with the checks
// after each, the final heal and checks. It returns the history; err is
// nil when no invariant was violated (History.Violations lists them).
func Run(ctx context.Context, cfg Config) (*History, error) {
	switch {
	case cfg.Steps == 0:
		cfg.Steps = 12
	case cfg.Steps < 0:
		cfg.Steps = 0
	}
	if cfg.VMs == 0 {
		cfg.VMs = 3
	}
	if cfg.OpTimeout == 0 {
		cfg.OpTimeout = 2 * time.Minute
	}
	if cfg.SettleTimeout == 0 {
		cfg.SettleTimeout = 3 * time.Minute
	}
	rng := rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0x9e3779b97f4a7c15))
	if cfg.Registry == "" {
		cfg.Registry = []registry.Mode{registry.ModeEtcd, registry.ModeEmbedded}[rng.IntN(2)]
	}
	s := &Schedule{cfg: cfg, rng: rng, links: map[string]*Link{}, listen: map[string]string{},
		down: map[string]bool{}, lost: map[string]*lostHost{}, regOwner: map[string]string{}, maxGen: map[string]uint64{}, started: time.Now(), lin: &linHistory{start: time.Now()}}
	s.hist = &History{Seed: cfg.Seed, Registry: string(cfg.Registry), Failover: cfg.Failover, First: cfg.First, Faults: map[string]int{}, log: cfg.Log}
	defer s.closeLinks()
	defer s.closeLogs()
	var err error
	if s.custodians, err = newCustodians(); err != nil {
		return s.hist, fmt.Errorf("soak: seed %d: %w: custodians: %w", cfg.Seed, ErrSetup, err)
	}
	defer s.custodians.close()
	if err := s.start(ctx); err != nil {
		return s.hist, fmt.Errorf("soak: seed %d: %w: %w", cfg.Seed, ErrSetup, err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		_ = s.f.Close(cctx)
	}()
	s.hist.add(0, "setup", fmt.Sprintf("registry %s, %d VMs on %s", cfg.Registry, len(s.vms), Hosts[0]), "ok")
	if cfg.Mutate != nil {
		vms := make([]fleet.VM, len(s.vms))
		for i, v := range s.vms {
			vms[i] = v.VM
		}
		s.hist.add(0, "mutate", "the test breaks the fleet", outcome(cfg.Mutate(ctx, s.f, vms), "mutation"))
	}
	s.checkStep(ctx, 0)
	for i := 1; i <= cfg.Steps && ctx.Err() == nil; i++ {
		st := s.draw(i)
		s.step = i
		t0 := time.Now()
		s.mayFailOver(st)
		out := s.run(ctx, st)
		s.hist.Steps++
		s.hist.addTimed(i, st.Kind, st.String(), out, time.Since(t0))
		s.noteFenced(i)
		s.checkStep(ctx, i)
	}
	s.finish(ctx)
	if cfg.Failover {
		for _, h := range Hosts {
			if n := s.f.Fenced(h); n > 0 {
				s.hist.Faults["fence-agent-run"] += n
			}
		}
	}
	s.hist.Wall = time.Since(s.started)
	if len(s.hist.Violations) > 0 {
		return s.hist, fmt.Errorf("soak: seed %d: %d invariant violations: %w", cfg.Seed, len(s.hist.Violations), ErrViolation)
	}
	return s.hist, nil
}

// Errors of Run.
var (
	// ErrViolation means an invariant was violated.
	ErrViolation = errors.New("invariant violated")
	// ErrSetup means the fleet did not start (no schedule ran).
	ErrSetup = errors.New("fleet set-up failed")
)

// start makes the fleet with a link per party pair and the VMs.
func (s *Schedule) start(ctx context.Context) error {
	specs := make([]inproc.HostSpec, len(Hosts))
	for i, h := range Hosts {
		specs[i] = inproc.HostSpec{Name: h}
	}
	var cerr error
	configure := func(h string, c *daemon.Config) {
		s.mu.Lock()
		s.listen[h] = c.Listen
		s.mu.Unlock()
		if s.cfg.Failover {
			c.Standby = daemon.StandbyConfig{MaxLag: "3s", Failover: "auto"}
		}
		c.Escrow = s.custodians.cfg // the restore op backs up to them
		c.Peers = map[string]string{}
		for _, o := range Hosts {
			if o == h {
				continue
			}
			l, err := s.link(h, o, func() string { s.mu.Lock(); defer s.mu.Unlock(); return s.listen[o] })
			if err != nil {
				cerr = err
				return
			}
			c.Peers[o] = l.Addr()
		}
		if c.Registry.Mode == registry.ModeEmbedded {
			if err := s.peerLinks(h, c); err != nil {
				cerr = err
			}
			return
		}
		if c.Registry.Mode != registry.ModeEtcd {
			return
		}
		for i, ep := range c.Registry.Endpoints {
			real := ep[len("https://"):]
			l, err := s.link(h, fmt.Sprintf("etcd-%d", i+1), func() string { return real })
			if err != nil {
				cerr = err
				return
			}
			c.Registry.Endpoints[i] = "https://" + l.Addr()
		}
	}
	icfg := inproc.Config{Hosts: specs, HookMode: true, Registry: s.cfg.Registry, Configure: configure,
		EvacuationSettle: 10 * time.Second, RegistryTTL: 5 * time.Second, FenceAgent: s.cfg.Failover}
	if s.cfg.DaemonLogs != "" {
		icfg.Log = s.daemonLog
	}
	f, err := inproc.New(ctx, icfg)
	if err == nil && cerr != nil {
		_ = f.Close(ctx)
		err = cerr
	}
	if err != nil {
		return err
	}
	s.f = f
	for i := range s.cfg.VMs {
		vm, err := f.CreateVM(ctx, Hosts[0], fmt.Sprintf("soak-%d", i+1))
		if err != nil {
			return err
		}
		secret, err := f.Host(Hosts[0]).TenantSecret(ctx, vm)
		if err != nil {
			return err
		}
		if s.cfg.Failover {
			if _, err := f.InProcHost(Hosts[0]).Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm.UUID, On: Hosts[1:]}); err != nil {
				return fmt.Errorf("standby %s: %w", vm.Name, err)
			}
		}
		s.vms = append(s.vms, soakVM{VM: vm, secret: secret})
	}
	return nil
}

func (s *Schedule) link(from, to string, target func() string) (*Link, error) {
	l, err := NewLink(from+">"+to, target)
	if err != nil {
		return nil, err
	}
	s.links[l.Name] = l
	return l, nil
}

func (s *Schedule) closeLinks() {
	for _, l := range s.links {
		_ = l.Close()
	}
	if s.peers != nil {
		_ = s.peers.Close()
	}
}

// peerLinks puts the peer fronts between the embedded members (made at
// the first host's configuration): every member advertises its front as
// its peer URL and listens where the fleet put it.
func (s *Schedule) peerLinks(h string, c *daemon.Config) error {
	real := map[string]string{}
	for _, m := range c.Registry.Embedded.Members {
		real[m.Name] = strings.TrimPrefix(m.PeerURL, "https://")
	}
	if s.peers == nil {
		var names []string
		for _, m := range c.Registry.Embedded.Members {
			names = append(names, m.Name)
		}
		p, err := NewPeerLinks(filepath.Dir(c.TLS.CA), names, func(m string) string { return real[m] })
		if err != nil {
			return err
		}
		s.peers = p
		for n, l := range p.Links() {
			s.links[n] = l
		}
	}
	self := c.Registry.Embedded.Name
	if self == "" {
		self = h
	}
	ms := slices.Clone(c.Registry.Embedded.Members) // the fleet shares its slice between hosts
	for i := range ms {
		if ms[i].Name == self {
			c.Registry.Embedded.ListenPeerURL = ms[i].PeerURL
		}
		ms[i].PeerURL = "https://" + s.peers.Addr(ms[i].Name)
	}
	c.Registry.Embedded.Members = ms
	return nil
}

// upHosts are the hosts whose vtpmd runs, sorted.
func (s *Schedule) upHosts() []string {
	var out []string
	for _, h := range Hosts {
		if !s.down[h] {
			out = append(out, h)
		}
	}
	return out
}

func (s *Schedule) downHosts() []string {
	var out []string
	for _, h := range Hosts {
		if s.down[h] {
			out = append(out, h)
		}
	}
	return out
}

// cutLinks are the links not up, sorted.
func (s *Schedule) cutLinks() []string {
	var out []string
	for name, l := range s.links {
		if l.State() != LinkUp {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

// runningOn is the host whose hypervisor runs vm ("" if none or several).
func (s *Schedule) runningOn(ctx context.Context, vm fleet.VM) string {
	var on []string
	for _, h := range Hosts {
		d, err := s.f.InProcHost(h).Fake().Domain(ctx, vm.UUID)
		if err == nil && d.State == hypervisor.StateRunning {
			on = append(on, h)
		}
	}
	if len(on) != 1 {
		return ""
	}
	return on[0]
}

// daemonLog is a host's vtpmd logger when Config.DaemonLogs is set: the
// same one (and file) across the host's restarts.
func (s *Schedule) daemonLog(host string) logrus.FieldLogger {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	if l, ok := s.logs[host]; ok {
		return l
	}
	l := logrus.New()
	l.SetFormatter(&logrus.JSONFormatter{})
	l.SetLevel(logrus.DebugLevel)
	path := filepath.Join(s.cfg.DaemonLogs, fmt.Sprintf("seed-%d-%s.log", s.cfg.Seed, host))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		l.SetOutput(io.Discard)
	} else {
		l.SetOutput(f)
		s.files = append(s.files, f)
	}
	if s.logs == nil {
		s.logs = map[string]logrus.FieldLogger{}
	}
	s.logs[host] = l.WithField("host", host)
	return s.logs[host]
}

// closeLogs closes the daemon log files once the fleet is closed.
func (s *Schedule) closeLogs() {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	for _, f := range s.files {
		_ = f.Close()
	}
}
