// Package inproc is the in-process implementation of the test fleet
// contract (test/fleet): every host is a real vtpmd daemon started with
// daemon.Start in this process, on a real emulated host TPM (swtpm with
// its own EK CA, booted from a real event log), with the fake hypervisor
// of one shared fake.Network (every vTPM a real swtpm process) and the
// agent wire as real gRPC over mutual TLS on loopback. The operator's
// files are made the way vtpmctl makes them (pki, golden policy), and the
// hosts enrol each other through their admin APIs.
//
// It replaces internal/devfleet. It needs swtpm and runs under plain go
// test.
package inproc

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/fake"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/fixtures"
	"github.com/vtpmm/vtpmm/internal/guestseal"
	"github.com/vtpmm/vtpmm/internal/pki"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/operator"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/vtpm/emuhost"
	"github.com/vtpmm/vtpmm/vtpm/host"
)

// GoldenPCRs are the PCRs the fleet's golden policy checks.
var GoldenPCRs = []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}

// HookFunc is what the fake hypervisor runs where libvirt runs vtpmm's
// qemu hook: op and subop as libvirt names them ("migrate begin",
// "prepare begin", "release end"), against the admin socket of the host it
// runs on. DirectHook calls the admin API as 'vtpmctl hook qemu' does.
type HookFunc func(ctx context.Context, socket, op, subop, vmUUID, name string) error

// Config configures a Fleet.
type Config struct {
	// Hosts are the hosts and whether each boots the tampered log; nil:
	// host-a and host-b trusted, host-c tampered (fleet.HostA...).
	Hosts []HostSpec
	// HookMode installs Hook (DirectHook when nil) as every fake host's
	// migrate/prepare/release hooks.
	HookMode bool
	Hook     HookFunc
	// Log returns the logger of a host's daemon (nil: discard).
	Log func(host string) logrus.FieldLogger
	// Registry is the fleet registry's mode: embedded (the default: every
	// host's vtpmd runs an etcd member), etcd (an external cluster of
	// three members, run in this process apart from the hosts) or none
	// (peer-to-peer: static peers, every host enrols every other).
	Registry registry.Mode
	// EnrollLast leaves the last host unenrolled (registry modes): a
	// benchmark enrols it (EnrollVia) and counts what that costs.
	EnrollLast bool
	// Configure, when set, adjusts each host's vtpmd configuration before
	// its daemon starts (escrow custodians, backup schedule).
	Configure func(host string, c *daemon.Config)
	// TPMProfile is every host TPM's latency profile (none, ftpm, dtpm;
	// default none).
	TPMProfile string
	// EvacuationSettle bounds an evacuation's wait for open transactions
	// (0: the daemon's default).
	EvacuationSettle time.Duration
	// RegistryTTL is the hosts' liveness lease (0: 2 s, so that a killed
	// host is seen not live within seconds). Tests whose plans need every
	// host live on a loaded machine give a longer one.
	RegistryTTL time.Duration
	// FenceAgent gives every daemon the fleet's fence agent (Fleet.Fence)
	// for failovers (issue 15).
	FenceAgent bool
}

// HostSpec names a host and whether it boots the tampered log.
type HostSpec struct {
	Name     string
	Tampered bool
}

// Fleet is an in-process fleet. It implements fleet.Fleet.
type Fleet struct {
	cfg      Config
	dir      string
	pkiDir   string
	policy   string
	rootsDir string
	net      *fake.Network
	hosts    map[string]*Host
	order    []string

	members  []registry.Member  // the registry's members (embedded: the hosts; etcd: etcd-N)
	external []*registry.Client // the external cluster's members (mode etcd)
	op       *registry.Client   // the operator's registry client (root)
	// Enrolments reports each host's one enrolment (registry modes).
	Enrolments map[string]operator.EnrollReport

	fenced fences // the fence agent's runs (failover.go)
	// AfterFence, when set, runs at the end of each Fence (tests: a host
	// that comes back between the fence agent and the fence record).
	AfterFence func(ctx context.Context, host string)
}

var _ fleet.Fleet = (*Fleet)(nil)

// Host is one in-process host. It implements fleet.Host.
type Host struct {
	f      *Fleet
	name   string
	cfg    daemon.Config
	member registry.Member // its registry member (mode embedded)
	emu    *emuhost.Host
	hyp    *fake.Host
	admin  *adminapi.Client

	// life serialises Kill, Crash, Restart, LoseTPM and the fence agent:
	// a host is powered off after it booted, not halfway through.
	life   sync.Mutex
	mu     sync.Mutex
	d      *daemon.Daemon
	closed chan error // Kill's Close result
	dying  atomic.Bool
	// restarting: Restart is starting a new daemon (the old one, closed,
	// is still h.d until then).
	restarting atomic.Bool
	crash      atomic.Pointer[func(migrate.CrashPoint) error]
}

var _ fleet.Host = (*Host)(nil)

// New provisions and starts a fleet below a new directory in /tmp (unix
// socket paths stay short): the agents' PKI, the golden policy, every
// host's TPM (booted), vtpmd init, its daemon, and the enrolments. Close
// stops everything.
//
// A start that lost a member's port to another process between its pick
// and etcd's bind (registrytest.FreeAddr; "bind: address already in use",
// a CI run of 550ea90 with other fleets on the machine) is retried from
// scratch on fresh ports, at most startAttempts times in all.
func New(ctx context.Context, cfg Config) (*Fleet, error) {
	for attempt := 1; ; attempt++ {
		f, err := newFleet(ctx, cfg)
		if err == nil || attempt == startAttempts || !portTaken(err) {
			return f, err
		}
	}
}

// startAttempts bounds New's retries of a start whose port was taken.
const startAttempts = 3

// portTaken reports whether err is a listener's bind refused because the
// address is in use.
func portTaken(err error) bool { return errors.Is(err, syscall.EADDRINUSE) }

// newFleet is one attempt of New.
func newFleet(ctx context.Context, cfg Config) (_ *Fleet, err error) {
	if cfg.Hosts == nil {
		cfg.Hosts = []HostSpec{{Name: fleet.HostA}, {Name: fleet.HostB}, {Name: fleet.HostC, Tampered: true}}
	}
	if cfg.HookMode && cfg.Hook == nil {
		cfg.Hook = DirectHook
	}
	if cfg.Registry == "" {
		cfg.Registry = registry.ModeEmbedded
	}
	dir, err := os.MkdirTemp("/tmp", "vtpmm-fleet-")
	if err != nil {
		return nil, err
	}
	f := &Fleet{cfg: cfg, dir: dir, net: fake.NewNetwork(), hosts: map[string]*Host{},
		pkiDir: filepath.Join(dir, "pki"), policy: filepath.Join(dir, "policy.yaml"), rootsDir: filepath.Join(dir, "roots")}
	defer func() {
		if err != nil {
			_ = f.Close(context.WithoutCancel(ctx))
		}
	}()
	if err := f.provision(); err != nil {
		return nil, err
	}
	if err := f.startExternal(ctx); err != nil {
		return nil, err
	}
	wires := map[string]net.Listener{}
	for _, s := range cfg.Hosts {
		h, lis, err := f.addHost(ctx, s)
		if err != nil {
			return nil, fmt.Errorf("inproc: host %s: %w", s.Name, err)
		}
		wires[s.Name] = lis
		h.cfg.Listen = lis.Addr().String()
	}
	if cfg.Registry == registry.ModeNone {
		for _, name := range f.order {
			h := f.hosts[name]
			h.cfg.Peers = map[string]string{}
			for _, o := range f.order {
				if o != name {
					h.cfg.Peers[o] = f.hosts[o].cfg.Listen
				}
			}
		}
	} else {
		f.configureRegistry()
	}
	if cfg.Configure != nil {
		for _, name := range f.order {
			cfg.Configure(name, &f.hosts[name].cfg)
		}
	}
	for _, name := range f.order {
		if err := f.hosts[name].start(ctx, wires[name]); err != nil {
			return nil, err
		}
	}
	if cfg.Registry != registry.ModeNone {
		return f, f.enrolOnce(ctx)
	}
	for _, name := range f.order {
		for _, other := range f.order {
			if other == name {
				continue
			}
			if _, err := f.hosts[name].admin.Enroll(ctx, other); err != nil {
				return nil, fmt.Errorf("inproc: %s enrols %s: %w", name, other, err)
			}
		}
	}
	return f, nil
}

// provision makes what an operator makes before the first vtpmd starts:
// the agents' PKI (vtpmctl pki init / issue) and the golden policy from
// the known-good boot (vtpmctl eventlog golden).
func (f *Fleet) provision() error {
	ca, err := pki.InitCA(f.pkiDir, pki.CAOptions{})
	if err != nil {
		return fmt.Errorf("inproc: %w", err)
	}
	names := []string{"root"} // the operator, etcd's root user
	for _, s := range f.cfg.Hosts {
		names = append(names, s.Name)
	}
	if f.cfg.Registry == registry.ModeEtcd {
		names = append(names, externalMembers...)
	}
	for _, n := range names {
		if _, _, err := ca.IssueToDir(n, f.pkiDir, pki.IssueOptions{}); err != nil {
			return fmt.Errorf("inproc: issue %s: %w", n, err)
		}
	}
	l, err := attest.ParseEventLog(fixtures.GoodBootLog())
	if err != nil {
		return err
	}
	p, err := attest.GoldenFromEventLog(l, "sha256", GoldenPCRs)
	if err != nil {
		return err
	}
	pol, err := p.Marshal()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(f.rootsDir, 0o700); err != nil {
		return err
	}
	return os.WriteFile(f.policy, pol, 0o600)
}

// addHost starts a host's TPM (booted), trusts its CA, runs 'vtpmd init',
// adds its fake hypervisor and binds its agent wire.
func (f *Fleet) addHost(ctx context.Context, s HostSpec) (*Host, net.Listener, error) {
	dir := filepath.Join(f.dir, s.Name)
	emu, err := emuhost.Start(ctx, emuhost.Config{Dir: filepath.Join(dir, "hosttpm"), Name: s.Name})
	if err != nil {
		return nil, nil, err
	}
	h := &Host{f: f, name: s.Name, emu: emu}
	if f.cfg.Registry == registry.ModeEmbedded {
		if h.member, err = newMember(s.Name); err != nil {
			return nil, nil, err
		}
	}
	f.hosts[s.Name] = h
	f.order = append(f.order, s.Name)
	bootLog := "eventlogs/gce-cos-85.eventlog.bin"
	if s.Tampered {
		bootLog = "eventlogs/ubuntu-2104-no-secure-boot.bin"
	}
	logPath, err := fixtures.Write(dir, bootLog)
	if err != nil {
		return nil, nil, err
	}
	logBytes, _ := os.ReadFile(logPath)
	if err := emu.Boot(ctx, logBytes); err != nil {
		return nil, nil, err
	}
	for _, p := range []string{emu.RootCAPath(), emu.IntermediateCAPath()} {
		b, err := os.ReadFile(p)
		if err == nil {
			err = os.WriteFile(filepath.Join(f.rootsDir, s.Name+"-"+filepath.Base(p)), b, 0o600)
		}
		if err != nil {
			return nil, nil, err
		}
	}
	c := daemon.DefaultConfig()
	c.HostID, c.DataDir, c.RunDir, c.TPM = s.Name, filepath.Join(dir, "data"), filepath.Join(dir, "run"), emu.URI()
	c.TLS = daemon.TLSConfig{CA: filepath.Join(f.pkiDir, "ca.crt"),
		Cert: filepath.Join(f.pkiDir, s.Name+".crt"), Key: filepath.Join(f.pkiDir, s.Name+".key")}
	c.Attestation = daemon.AttestationConfig{Policy: f.policy, Roots: []string{f.rootsDir},
		Enrollments: filepath.Join(dir, "enrollments.json"), EvidenceMaxAge: "60s"}
	c.EventLog = logPath
	if f.cfg.TPMProfile != "" {
		c.TPMProfile = f.cfg.TPMProfile
	}
	h.cfg = c
	h.admin = adminapi.NewClient(c.AdminSocketPath())
	if _, err := host.Init(ctx, c.Config, host.Options{}, host.InitOptions{}); err != nil {
		return nil, nil, err
	}
	if h.hyp, err = f.net.AddHost(ctx, fake.HostConfig{Name: s.Name, Dir: filepath.Join(dir, "hypervisor")}); err != nil {
		return nil, nil, err
	}
	if f.cfg.HookMode {
		f.installHooks(h)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, err
	}
	return h, lis, nil
}

// installHooks makes h's fake hypervisor call the hook where libvirt does.
func (f *Fleet) installHooks(h *Host) {
	sock := h.cfg.AdminSocketPath()
	hook := f.cfg.Hook
	h.hyp.MigrateBegin = func(ctx context.Context, vm, name string) error {
		return hook(ctx, sock, "migrate", "begin", vm, name)
	}
	h.hyp.PrepareBegin = func(ctx context.Context, vm, name string) error {
		return hook(ctx, sock, "prepare", "begin", vm, name)
	}
	h.hyp.Released = func(vm string) {
		_ = hook(context.Background(), sock, "release", "end", vm, f.vmName(vm))
	}
}

// DirectHook calls the admin API as 'vtpmctl hook qemu' does for
// vtpmm's VMs: pull at "migrate begin", prepare at "prepare begin",
// released at "release end" (whose failures it ignores).
func DirectHook(ctx context.Context, socket, op, subop, vmUUID, name string) error {
	c, req := adminapi.NewClient(socket), adminapi.HookRequest{UUID: vmUUID, Name: name}
	switch op + " " + subop {
	case "migrate begin":
		_, err := c.HookPull(ctx, req)
		return err
	case "prepare begin":
		_, err := c.HookPrepare(ctx, req)
		if errors.Is(err, adminapi.ErrUnreachable) {
			return nil // vtpmd down does not block starts
		}
		return err
	case "release end":
		_ = c.HookReleased(ctx, req)
	}
	return nil
}

func (f *Fleet) vmName(uuid string) string {
	for _, h := range f.hosts {
		if d, err := h.hyp.Domain(context.Background(), uuid); err == nil && d.Name != "" {
			return d.Name
		}
	}
	return ""
}

// Kind is "in-process".
func (f *Fleet) Kind() string { return "in-process" }

// HookMode reports whether the hooks are installed.
func (f *Fleet) HookMode() bool { return f.cfg.HookMode }

// Host returns a host by name (nil if unknown).
func (f *Fleet) Host(name string) fleet.Host {
	if h, ok := f.hosts[name]; ok {
		return h
	}
	return nil
}

// InProcHost returns a host with its in-process parts.
func (f *Fleet) InProcHost(name string) *Host { return f.hosts[name] }

// HostNames lists the hosts, sorted.
func (f *Fleet) HostNames() []string {
	out := append([]string(nil), f.order...)
	sort.Strings(out)
	return out
}

// CreateVM creates a VM on host as an operator does: 'vtpmctl vm create'
// (the daemon makes the key and the encrypted swtpm state, records the VM
// in the fleet registry and defines its secret on the hypervisor), the
// domain defined and started; then its tenant seals a random secret in
// the vTPM (PCR 16 policy).
func (f *Fleet) CreateVM(ctx context.Context, hostName, name string) (fleet.VM, error) {
	h, ok := f.hosts[hostName]
	if !ok {
		return fleet.VM{}, fmt.Errorf("inproc: no host %s", hostName)
	}
	d := h.daemon()
	vm, err := d.CreateVM(ctx, name, "") // key, state, registry record, hypervisor secret
	if err != nil {
		return fleet.VM{}, err
	}
	if err := h.hyp.DefineVTPMDomain(ctx, hypervisor.Domain{UUID: vm.UUID, Name: name}, d.Host().Layout().VMState(vm.UUID)); err != nil {
		return fleet.VM{}, err
	}
	if err := h.hyp.StartDomain(ctx, vm.UUID); err != nil {
		return fleet.VM{}, err
	}
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	secret := "tenant-" + hex.EncodeToString(b)
	if err := h.withVTPM(ctx, vm.UUID, func(tpm transport.TPM) error { return guestseal.Seal(ctx, tpm, []byte(secret), []int{16}) }); err != nil {
		return fleet.VM{}, fmt.Errorf("tenant seal: %w", err)
	}
	return fleet.VM{Name: name, UUID: vm.UUID}, nil
}

// RemoveVM destroys and undefines the VM's domain on every host.
func (f *Fleet) RemoveVM(ctx context.Context, vm fleet.VM) error {
	var errs []error
	for _, name := range f.order {
		h := f.hosts[name]
		d, err := h.hyp.Domain(ctx, vm.UUID)
		if err != nil || d.State == hypervisor.StateAbsent {
			continue
		}
		if d.State == hypervisor.StateRunning {
			errs = append(errs, h.hyp.DestroyDomain(ctx, vm.UUID))
		}
		errs = append(errs, h.hyp.UndefineDomain(ctx, vm.UUID))
	}
	return errors.Join(errs...)
}

// Close stops every daemon (at once: the registry's embedded members go
// together), the external registry, hypervisor hosts and TPMs, and removes
// the fleet's directory.
func (f *Fleet) Close(ctx context.Context) error {
	var errs []error
	if f.op != nil {
		errs = append(errs, f.op.Close())
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, name := range f.order {
		h := f.hosts[name]
		if d := h.daemon(); d != nil {
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := d.Close(ctx)
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}()
		}
	}
	wg.Wait()
	for _, m := range f.external {
		errs = append(errs, m.Close())
	}
	errs = append(errs, f.net.Close(ctx))
	for _, name := range f.order {
		if h := f.hosts[name]; h.emu != nil {
			errs = append(errs, h.emu.Stop(ctx))
		}
	}
	_ = os.RemoveAll(f.dir)
	return errors.Join(errs...)
}
