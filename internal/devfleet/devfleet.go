// Package devfleet provisions a development fleet: emulated hosts (an
// swtpm "hardware" TPM booted from a TCG event log, a vault, an AK and a
// migration key) each running a real vtpmd daemon with the
// agent wire on loopback and a hypervisor host of one shared fake network.
// The demo and the daemon tests use it; nothing in production does.
package devfleet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/fake"
	"github.com/vtpmm/vtpmm/vtpm/emuhost"
	"github.com/vtpmm/vtpmm/vtpm/host"
)

// Config is what the operator prepared: the agents' PKI (ca.crt and
// HOST.crt/HOST.key, from vtpmctl pki) and the attestation policy.
type Config struct {
	Root       string // everything of the fleet goes below
	PKIDir     string
	PolicyFile string
	// Log returns the logger of a host's daemon (nil: discard).
	Log func(host string) logrus.FieldLogger
}

// Fleet is a set of hosts that trust each other's TPM CAs.
type Fleet struct {
	cfg      Config
	Net      *fake.Network
	RootsDir string
	Hosts    map[string]*Host
	order    []string
}

// Host is one emulated host and its daemon.
type Host struct {
	Name   string
	Cfg    daemon.Config
	Emu    *emuhost.Host
	Hyp    *fake.Host
	Wire   net.Listener
	Daemon *daemon.Daemon
}

// New starts an empty fleet.
func New(cfg Config) *Fleet {
	return &Fleet{cfg: cfg, Net: fake.NewNetwork(), RootsDir: filepath.Join(cfg.Root, "roots"), Hosts: map[string]*Host{}}
}

// AddHost provisions a host booted from bootLog: its TPM, vtpmd init and
// the operator's trust in its TPM CA. The daemon starts with Start; hosts
// enrol each other with EnrollAll (or vtpmctl host enroll).
func (f *Fleet) AddHost(ctx context.Context, name, bootLog string) (*Host, error) {
	dir := filepath.Join(f.cfg.Root, name)
	emu, err := emuhost.Start(ctx, emuhost.Config{Dir: filepath.Join(dir, "hosttpm"), Name: name})
	if err != nil {
		return nil, err
	}
	h := &Host{Name: name, Emu: emu}
	f.Hosts[name] = h
	f.order = append(f.order, name)
	logBytes, err := os.ReadFile(bootLog)
	if err != nil {
		return nil, err
	}
	if err := emu.Boot(ctx, logBytes); err != nil {
		return nil, err
	}
	runDir, err := os.MkdirTemp("/tmp", "vtpmm-"+name+"-")
	if err != nil {
		return nil, err
	}
	c := daemon.DefaultConfig()
	c.HostID, c.DataDir, c.RunDir, c.TPM = name, filepath.Join(dir, "data"), runDir, emu.URI()
	c.TLS = daemon.TLSConfig{CA: filepath.Join(f.cfg.PKIDir, "ca.crt"),
		Cert: filepath.Join(f.cfg.PKIDir, name+".crt"), Key: filepath.Join(f.cfg.PKIDir, name+".key")}
	c.Attestation = daemon.AttestationConfig{Policy: f.cfg.PolicyFile, Roots: []string{f.RootsDir},
		Enrollments: filepath.Join(dir, "enrollments.json"), EvidenceMaxAge: "60s"}
	c.EventLog = bootLog
	c.LogLevel = "debug"
	h.Cfg = c
	if _, err := host.Init(ctx, c.Config, host.Options{}, host.InitOptions{}); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(f.RootsDir, 0o700); err != nil {
		return nil, err
	}
	for _, p := range []string{emu.RootCAPath(), emu.IntermediateCAPath()} {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(f.RootsDir, name+"-"+filepath.Base(p)), b, 0o600); err != nil {
			return nil, err
		}
	}
	if h.Hyp, err = f.Net.AddHost(ctx, fake.HostConfig{Name: name, Dir: filepath.Join(dir, "hypervisor")}); err != nil {
		return nil, err
	}
	if h.Wire, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return nil, err
	}
	return h, nil
}

// Start starts every host's daemon, each knowing the others as peers.
func (f *Fleet) Start(ctx context.Context) error {
	for _, name := range f.order {
		h := f.Hosts[name]
		h.Cfg.Peers = map[string]string{}
		for _, o := range f.Hosts {
			if o != h {
				h.Cfg.Peers[o.Name] = o.Wire.Addr().String()
			}
		}
	}
	for _, name := range f.order {
		if err := f.startDaemon(ctx, f.Hosts[name]); err != nil {
			return err
		}
	}
	return nil
}

func (f *Fleet) startDaemon(ctx context.Context, h *Host) error {
	var log logrus.FieldLogger
	if f.cfg.Log != nil {
		log = f.cfg.Log(h.Name)
	}
	d, err := daemon.Start(ctx, h.Cfg, daemon.Deps{
		Host: host.Options{Log: log}, Hypervisor: h.Hyp, WireListener: h.Wire,
		Target: func(host string) (hypervisor.Target, error) {
			t, ok := f.Net.Host(host)
			if !ok {
				return hypervisor.Target{}, fmt.Errorf("no hypervisor host %s", host)
			}
			return t.Target(), nil
		},
	})
	if err != nil {
		return fmt.Errorf("start vtpmd on %s: %w", h.Name, err)
	}
	h.Daemon = d
	select {
	case <-d.Ready():
		return nil
	case err := <-d.Err():
		return fmt.Errorf("vtpmd on %s: %w", h.Name, err)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// EnrollAll has every host enrol every other host, over the agent wire,
// as 'vtpmctl host enroll' does.
func (f *Fleet) EnrollAll(ctx context.Context) error {
	for _, name := range f.order {
		for _, other := range f.order {
			if other == name {
				continue
			}
			if _, err := f.Hosts[name].Daemon.Enroll(ctx, other); err != nil {
				return fmt.Errorf("%s enrolls %s: %w", name, other, err)
			}
		}
	}
	return nil
}

// StopDaemon shuts a host's daemon down (Close).
func (h *Host) StopDaemon() error {
	if h.Daemon == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return h.Daemon.Close(ctx)
}

// CreateRunningVM creates a VM's vTPM with vtpmd and has the hypervisor
// define and start it with the VM key as its vTPM secret.
func (h *Host) CreateRunningVM(ctx context.Context, name string) (string, error) {
	vm, err := h.Daemon.Host().CreateVM(ctx, name, "")
	if err != nil {
		return "", err
	}
	_, err = h.Daemon.Host().Keys().WithPassphrase(ctx, vm.UUID, func(pass []byte) error {
		return h.Hyp.DefineSecret(ctx, vm.UUID, pass)
	})
	if err != nil {
		return "", err
	}
	state := filepath.Join(h.Cfg.DataDir, "vms", vm.UUID, "tpm2")
	if err := h.Hyp.DefineVTPMDomain(ctx, hypervisor.Domain{UUID: vm.UUID, Name: name}, state); err != nil {
		return "", err
	}
	return vm.UUID, h.Hyp.StartDomain(ctx, vm.UUID)
}

// Close stops every daemon, hypervisor host and TPM, and removes run dirs.
func (f *Fleet) Close(ctx context.Context) error {
	var errs []error
	for _, name := range f.order {
		h := f.Hosts[name]
		errs = append(errs, h.StopDaemon())
	}
	errs = append(errs, f.Net.Close(ctx))
	for _, name := range f.order {
		h := f.Hosts[name]
		if h.Emu != nil {
			errs = append(errs, h.Emu.Stop(ctx))
		}
		if h.Cfg.RunDir != "" {
			_ = os.RemoveAll(h.Cfg.RunDir)
		}
	}
	return errors.Join(errs...)
}
