package lab

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/test/guest"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/host"
)

// QuotedPCRs is the PCR list of the fleet's policy (vtpmctl eventlog
// golden --pcrs).
const QuotedPCRs = "0,1,2,3,4,5,6,7,8,9"

// HostSpec names a fleet host, its IP on the lab network and the event log
// its host TPM boots with.
type HostSpec struct{ Name, IP, BootLog string }

// FleetConfig configures NewFleet.
type FleetConfig struct {
	Network NetworkConfig
	Tools   Tools
	// GoodLog is the known-good boot log the policy is built from.
	GoodLog string
	// Hosts are the fleet's hosts: each gets a TLS certificate for its IP
	// and is every other host's peer. AddHost brings them up.
	Hosts []HostSpec
	// Log receives the libvirt Hypervisors' logs (default: discarded).
	Log logrus.FieldLogger
	// HookMode installs vtpmm's libvirt qemu hook on every host before its
	// libvirtd starts ('vtpmctl hook install'), so a plain 'virsh migrate'
	// moves the vTPM key.
	HookMode bool
	// Registry is the fleet registry's mode: "" or "none" (static peers,
	// every host enrols every other) or "embedded" (an etcd member in each
	// host's vtpmd; the operator bootstraps it and enrols each host once).
	Registry string
}

// Fleet is a set of lab hosts, each running the real vtpmd binary in its
// namespaces, provisioned with the real CLIs as an operator would:
// vtpmctl pki init/issue, vtpmctl eventlog golden, vtpmd init, vtpmd run,
// vtpmctl host enroll.
type Fleet struct {
	T     T
	Net   *Network
	Tools Tools
	Hosts map[string]*FleetHost
	// Order lists the hosts in the order AddHost brought them up.
	Order []string
	// PKIDir holds the agents' CA and certificates, Policy the policy
	// file, RootsDir the trusted EK roots (every host TPM's CAs).
	PKIDir, Policy, RootsDir string

	cfg FleetConfig
}

// FleetHost is a lab host with its real vtpmd.
type FleetHost struct {
	*Host
	Vtpmd *Vtpmd
}

// NewFleet creates the network and the operator's files: 'vtpmctl pki
// init', 'vtpmctl pki issue HOST --ip IP' per host, and the policy from
// 'vtpmctl eventlog golden GOODLOG'. It starts no host (AddHost).
func NewFleet(ctx context.Context, t T, cfg FleetConfig) *Fleet {
	t.Helper()
	if cfg.Log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		cfg.Log = l
	}
	n := NewNetwork(ctx, t, cfg.Network)
	f := &Fleet{T: t, Net: n, Tools: cfg.Tools, Hosts: map[string]*FleetHost{}, cfg: cfg,
		PKIDir: filepath.Join(n.Dir, "pki"), RootsDir: filepath.Join(n.Dir, "ek-roots"), Policy: filepath.Join(n.Dir, "policy.yaml")}
	f.Ctl(ctx, "pki", "init", "--dir", f.PKIDir)
	for _, s := range cfg.Hosts {
		f.Ctl(ctx, "pki", "issue", s.Name, "--dir", f.PKIDir, "--ip", s.IP)
	}
	if f.Embedded() {
		f.Ctl(ctx, "pki", "issue", "root", "--client", "--dir", f.PKIDir) // the operator's registry user
	}
	r := f.Ctl(ctx, "eventlog", "golden", cfg.GoodLog, "--pcrs", QuotedPCRs)
	if err := os.WriteFile(f.Policy, []byte(r.Stdout), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(f.RootsDir, 0o700); err != nil {
		t.Fatal(err)
	}
	return f
}

// AddHosts brings up every host of the configuration (AddHost).
func (f *Fleet) AddHosts(ctx context.Context) {
	f.T.Helper()
	for _, s := range f.cfg.Hosts {
		f.AddHost(ctx, s.Name)
	}
}

// AddHost brings up the configured host name: namespaces, libvirtd, host
// TPM booted with its log (its CAs join the trusted EK roots), and its
// vtpmd configured and initialised ('vtpmd init'), not yet running.
func (f *Fleet) AddHost(ctx context.Context, name string) *FleetHost {
	t := f.T
	t.Helper()
	var spec *HostSpec
	peers := map[string]string{}
	for i, s := range f.cfg.Hosts {
		peers[s.Name] = s.IP
		if s.Name == name {
			spec = &f.cfg.Hosts[i]
		}
	}
	if spec == nil {
		t.Fatalf("lab: host %s is not in the fleet's configuration", name)
	}
	t0 := time.Now()
	hc := HostConfig{Network: f.Net, Name: spec.Name, IP: spec.IP, BootLog: spec.BootLog, Log: f.cfg.Log}
	if f.cfg.HookMode {
		hc.BeforeLibvirtd = func(h *Host) error {
			r, err := f.Tools.Ctl(ctx, "hook", "install", "--hooks-dir", h.Path("/etc/libvirt/hooks"),
				"--vtpmctl", f.Tools.Vtpmctl, "--socket", VtpmdSocket(h))
			if err == nil && r.Code != 0 {
				err = fmt.Errorf("%w: vtpmctl hook install on %s: %s", ErrVtpmd, h.Name, r)
			}
			return err
		}
	}
	h := NewHost(ctx, t, hc)
	for _, p := range []string{h.Emu.RootCAPath(), h.Emu.IntermediateCAPath()} {
		b, err := os.ReadFile(p)
		if err == nil {
			err = os.WriteFile(filepath.Join(f.RootsDir, spec.Name+"-"+filepath.Base(p)), b, 0o600)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	d := NewVtpmd(ctx, t, h, VtpmdConfig{Tools: f.Tools, PKIDir: f.PKIDir, Policy: f.Policy,
		RootsDir: f.RootsDir, Peers: peers, BootLog: spec.BootLog, Registry: f.cfg.Registry})
	fh := &FleetHost{Host: h, Vtpmd: d}
	f.Hosts[spec.Name] = fh
	f.Order = append(f.Order, spec.Name)
	t.Logf("host %s up with vtpmd initialised in %v", spec.Name, time.Since(t0).Round(time.Millisecond))
	return fh
}

// Ctl runs vtpmctl and fails the test unless it exits 0.
func (f *Fleet) Ctl(ctx context.Context, args ...string) Result {
	f.T.Helper()
	r, err := f.Tools.Ctl(ctx, args...)
	if err != nil || r.Code != 0 {
		f.T.Fatalf("vtpmctl %s: %v %s", strings.Join(args, " "), err, r)
	}
	return r
}

// Embedded reports whether the fleet's registry is embedded in its vtpmds.
func (f *Fleet) Embedded() bool { return f.cfg.Registry == "embedded" }

// Start runs every host's vtpmd (StartDaemons) and enrols the hosts: with
// an embedded registry, the operator bootstraps it and enrols each host
// once (EnrollOnce); without, every host enrols every other one.
func (f *Fleet) Start(ctx context.Context) {
	f.T.Helper()
	f.StartDaemons(ctx)
	if f.Embedded() {
		f.Bootstrap(ctx)
		for _, name := range f.Order {
			f.EnrollOnce(ctx, name)
		}
		return
	}
	for _, name := range f.Order {
		for _, other := range f.Order {
			if other != name {
				f.Enroll(ctx, f.Hosts[name], other)
			}
		}
	}
}

// OperatorArgs are the flags of an operator's registry command run on the
// first host (OperatorCtl): its admin socket (the registry's endpoints)
// and the operator's certificate ("root", in PKIDir).
func (f *Fleet) OperatorArgs() []string {
	return []string{"--socket", f.Hosts[f.Order[0]].Vtpmd.Socket, "--pki", f.PKIDir}
}

// OperatorCtl runs vtpmctl as the operator does on the first host: inside
// its namespaces (the registry's members listen on the lab network, which
// the root namespace does not reach), with OperatorArgs appended.
func (f *Fleet) OperatorCtl(ctx context.Context, args ...string) (Result, error) {
	return f.OperatorCtlOn(ctx, f.Hosts[f.Order[0]], args...)
}

// OperatorCtlOn is OperatorCtl on host h (its namespaces and its vtpmd's
// admin socket), for when the first host is down.
func (f *Fleet) OperatorCtlOn(ctx context.Context, h *FleetHost, args ...string) (Result, error) {
	cmd, err := h.NsCommand(ctx, f.Tools.Vtpmctl, append(args, "--socket", h.Vtpmd.Socket, "--pki", f.PKIDir)...)
	if err != nil {
		return Result{Code: -1}, err
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.WaitDelay = 5 * time.Second
	err = cmd.Run()
	r := Result{Stdout: out.String(), Stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.Code, err = ee.ExitCode(), nil
	case err != nil:
		r.Code = -1
	}
	return r, err
}

// Operator is OperatorCtl, failing the test unless vtpmctl exits 0.
func (f *Fleet) Operator(ctx context.Context, args ...string) Result {
	f.T.Helper()
	r, err := f.OperatorCtl(ctx, args...)
	if err != nil || r.Code != 0 {
		f.T.Fatalf("vtpmctl %s (the operator, on %s): %v %s", strings.Join(args, " "), f.Order[0], err, r)
	}
	return r
}

// Bootstrap runs 'vtpmctl registry bootstrap' as the operator, retrying
// while the members elect their first leader.
func (f *Fleet) Bootstrap(ctx context.Context) Result {
	f.T.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		r, err := f.OperatorCtl(ctx, "registry", "bootstrap")
		if err == nil && r.Code == 0 {
			return r
		}
		if time.Now().After(deadline) || (err == nil && r.Code != 6) {
			f.T.Fatalf("vtpmctl registry bootstrap: %v %s", err, r)
		}
		time.Sleep(time.Second)
	}
}

// EnrollOnce runs 'vtpmctl host enroll HOST' as the operator on the first
// host: the fleet registry's one enrolment of HOST, which every host
// trusts.
func (f *Fleet) EnrollOnce(ctx context.Context, host string) Result {
	f.T.Helper()
	return f.Operator(ctx, "host", "enroll", host)
}

// StartDaemons runs 'vtpmd run' on every host, in its namespaces.
func (f *Fleet) StartDaemons(ctx context.Context) {
	f.T.Helper()
	for _, name := range f.Order {
		t0 := time.Now()
		if err := f.Hosts[name].Vtpmd.Start(ctx); err != nil {
			f.T.Fatal(err)
		}
		f.T.Logf("vtpmd on %s serving after %v", name, time.Since(t0).Round(time.Millisecond))
	}
}

// Enroll runs 'vtpmctl host enroll OTHER' on h's vtpmd and fails the test
// unless it exits 0.
func (f *Fleet) Enroll(ctx context.Context, h *FleetHost, other string) Result {
	f.T.Helper()
	r, err := h.Vtpmd.Ctl(ctx, "host", "enroll", other)
	if err != nil || r.Code != 0 {
		f.T.Fatalf("%s: vtpmctl host enroll %s: %v %s", h.Name, other, err, r)
	}
	return r
}

// VM is a VM created by vtpmd and run by libvirt.
type VM struct {
	Name, UUID string
	// Serial is the console log path as libvirtd sees it (each host has
	// its own file there); empty for a firmware-only VM.
	Serial string
	// Generation is the VM key's generation at creation.
	Generation uint64
}

// CreateVM makes a VM on h (docs/libvirt.md, "vtpmd e2e"):
//   - with h's vtpmd running, 'vtpmctl vm create NAME --uuid U' has it make
//     the VM key (generation 1) and an encrypted swtpm state with EK
//     certificates in DATA/vms/U/tpm2, record the VM in the fleet registry
//     and define the libvirt secret; the rest below is the same;
//   - before h's vtpmd runs, 'vtpmd vm create NAME --uuid U' makes the key
//     and the state;
//   - that state is copied to libvirt's /var/lib/libvirt/swtpm/U/tpm2, so
//     libvirt starts swtpm on it and does not run swtpm_setup;
//   - the lab opens the host's vault (host.Open; the host TPM is free
//     because vtpmd is not running yet), takes the VM key's passphrase,
//     defines it as the ephemeral private libvirt secret, and wipes it; no
//     key is written anywhere;
//   - the domain is defined and started (with a serial console log when
//     spec boots a kernel).
func (f *Fleet) CreateVM(ctx context.Context, h *FleetHost, name string, spec libvirt.VMSpec) *VM {
	t := f.T
	t.Helper()
	vm := &VM{Name: name, UUID: NewUUID()}
	t0 := time.Now()
	running := h.Vtpmd.Running()
	if running {
		// 'vtpmctl vm create': the running vtpmd makes the key and the
		// state, records the VM in the fleet registry and defines the
		// libvirt secret.
		if r, err := h.Vtpmd.Ctl(ctx, "vm", "create", name, "--uuid", vm.UUID); err != nil || r.Code != 0 {
			t.Fatalf("vtpmctl vm create %s: %v %s", name, err, r)
		}
		vm.Generation = 1
	} else if r, err := h.Vtpmd.Run(ctx, "vm", "create", name, "--uuid", vm.UUID); err != nil || r.Code != 0 {
		t.Fatalf("vtpmd vm create %s: %v %s", name, err, r)
	}
	created := time.Since(t0)
	if orDefault(spec.TPMVersion, "2.0") == "2.0" {
		// vtpmd makes TPM 2.0 state only; for a TPM 1.2 vTPM (libvirt's
		// swtpm/U/tpm1.2) libvirt runs swtpm_setup itself at the first
		// start, with the same secret.
		src := filepath.Join(h.Vtpmd.DataDir, "vms", vm.UUID, "tpm2")
		dst := h.Path(filepath.Join("/var/lib/libvirt/swtpm", vm.UUID, "tpm2"))
		if err := copyDir(src, dst); err != nil {
			t.Fatal(err)
		}
	}
	if !running {
		err := h.Vtpmd.WithKeys(ctx, func(keys *vtpm.KeyStore) error {
			gen, err := keys.WithPassphrase(ctx, vm.UUID, func(pass []byte) error {
				return h.Hyp.DefineSecret(ctx, vm.UUID, pass)
			})
			vm.Generation = gen
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	spec.Name, spec.UUID, spec.SecretUUID, spec.Start = name, vm.UUID, hypervisor.SecretUUID(vm.UUID), true
	if spec.Kernel != "" {
		vm.Serial = "/var/log/libvirt/qemu/" + name + "-serial.log"
		spec.SerialLog = vm.Serial
	}
	t1 := time.Now()
	if err := h.Hyp.DefineVM(ctx, spec); err != nil {
		t.Fatal(err)
	}
	t.Logf("VM %s (%s, TPM %s) on %s: vtpmd vm create %v (generation %d), libvirt define+start %v",
		name, vm.UUID, orDefault(spec.TPMVersion, "2.0"), h.Name, created.Round(time.Millisecond), vm.Generation, time.Since(t1).Round(time.Millisecond))
	return vm
}

// WithKeys opens the host's vault in this process (host.Open with the
// vtpmd configuration; the daemon must not be running, since the host TPM
// serves one connection at a time), calls f with its key store, and
// closes it.
func (v *Vtpmd) WithKeys(ctx context.Context, f func(*vtpm.KeyStore) error) error {
	if v.Running() {
		return fmt.Errorf("%w: vtpmd on %s holds the host TPM", ErrVtpmd, v.Host.Name)
	}
	cfg, err := daemon.LoadConfig(v.ConfigPath)
	if err != nil {
		return err
	}
	a, err := host.Open(ctx, cfg.Config, host.Options{})
	if err != nil {
		return err
	}
	err = f(a.Keys())
	if cerr := a.Close(ctx); err == nil {
		err = cerr
	}
	return err
}

// TCGMigrationMaxDowntime is the maximum downtime of the lab's TCG
// guests' live migrations (LinuxSpec). QEMU 7.2 (Debian 12) loses guest
// memory writes when a TCG guest keeps running after a mid-migration
// dirty-bitmap sync (fixed in QEMU 9.0); the guest kernel then oopses on
// the destination. With this limit QEMU stops the guest once its first
// pre-copy pass has started, so no such sync happens while the guest
// runs; the downtime grows to about the whole transfer (2-3 s for 256
// MiB on a loaded machine). See docs/libvirt.md.
const TCGMigrationMaxDowntime = 10 * time.Second

// LinuxSpec is the Linux guest's domain: TCG, 256 MiB, TPM 2.0, booting
// img's kernel and initramfs ('vtpmm-guest serve' on the console), with
// TCGMigrationMaxDowntime.
func LinuxSpec(img *guest.Image) libvirt.VMSpec {
	return libvirt.VMSpec{MemoryMiB: 256, TCG: true, Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: guest.Cmdline, TPMVersion: "2.0",
		MigrationMaxDowntime: TCGMigrationMaxDowntime}
}

// NewUUID returns a random (version 4) UUID.
func NewUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

func copyDir(src, dst string) error {
	if err := os.MkdirAll(dst, 0o700); err != nil {
		return err
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if !e.Type().IsRegular() || e.Name() == ".lock" {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o600); err != nil {
			return err
		}
	}
	return nil
}
