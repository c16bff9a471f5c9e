package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/fake"
	"github.com/vtpmm/vtpmm/internal/agent"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/emuhost"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// migHost is one agent of the migration demo.
type migHost struct {
	name   string
	cfg    agent.Config
	emu    *emuhost.Host
	hyp    *fake.Host
	wire   net.Listener
	daemon *agent.Daemon
	done   chan error
}

// migration runs three vtpmd agents on loopback (gRPC over mTLS), each on
// its own emulated host TPM and hypervisor host, and drives them with the
// real vtpmctl and vtpmm-guest binaries.
func (d *demo) migration(ctx context.Context) error {
	fmt.Fprintf(d.out, "\n== Part 2: attested live migration between agents ==\n")
	root := filepath.Join(d.work, "fleet")
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	d.say("Development CA for the agents' mutual TLS: vtpmctl pki init / issue")
	pkiDir := filepath.Join(root, "pki")
	if _, err := d.vtpmctl(ctx, "pki", "init", "--dir", pkiDir); err != nil {
		return err
	}
	for _, h := range []string{"host-a", "host-b", "host-c"} {
		if _, err := d.vtpmctl(ctx, "pki", "issue", h, "--dir", pkiDir, "--out", pkiDir); err != nil {
			return err
		}
	}
	d.detail("CA and certificates for host-a, host-b, host-c in %s", pkiDir)

	d.say("Operator policy from the known-good boot log: vtpmctl eventlog golden")
	policy, err := d.vtpmctl(ctx, "eventlog", "golden", d.goodLog, "--pcrs", "0,1,2,3,4,5,6,7,8,9")
	if err != nil {
		return err
	}
	policyFile := filepath.Join(root, "policy.yaml")
	if err := os.WriteFile(policyFile, []byte(policy), 0o600); err != nil {
		return err
	}
	d.detail("policy pins PCRs 0-9 (sha256) and the event log's rules: %s", policyFile)

	d.say("Provision three hosts: A and B boot the good chain, C boots a tampered one")
	net := fake.NewNetwork()
	defer net.Close(context.WithoutCancel(ctx))
	rootsDir := filepath.Join(root, "roots")
	enrollFile := filepath.Join(root, "enrollments.json")
	hosts := map[string]*migHost{}
	for _, spec := range []struct{ name, log string }{{"host-a", d.goodLog}, {"host-b", d.goodLog}, {"host-c", d.badLog}} {
		h, err := d.provisionAgent(ctx, net, root, spec.name, spec.log, rootsDir, enrollFile, pkiDir, policyFile)
		if err != nil {
			return fmt.Errorf("provision %s: %w", spec.name, err)
		}
		hosts[spec.name] = h
	}
	for _, h := range hosts {
		h.cfg.Peers = map[string]string{}
		for _, o := range hosts {
			if o != h {
				h.cfg.Peers[o.name] = o.wire.Addr().String()
			}
		}
	}
	for _, name := range []string{"host-a", "host-b", "host-c"} {
		if err := d.startAgent2(ctx, net, hosts[name]); err != nil {
			return err
		}
	}
	defer func() {
		cancel()
		for _, h := range hosts {
			if h.done != nil {
				<-h.done
			}
		}
	}()
	a, b, c := hosts["host-a"], hosts["host-b"], hosts["host-c"]
	out, err := d.vtpmctl(ctx, "host", "list", "--socket", a.cfg.AdminSocketPath())
	if err != nil {
		return err
	}
	d.detail("vtpmctl host list (on host-a):\n     %s", indent(out))

	d.say("host-a creates VM web-1 with a vTPM; the hypervisor starts it; the guest seals a secret")
	vm, err := d.createRunningVM(ctx, a, "web-1")
	if err != nil {
		return err
	}
	secret := randomSecret()
	secretFile := filepath.Join(d.work, "guest2-secret.txt")
	if err := os.WriteFile(secretFile, []byte(secret), 0o600); err != nil {
		return err
	}
	uri, err := a.hyp.VTPMURI(vm)
	if err != nil {
		return err
	}
	if _, err := d.guest(ctx, uri, "seal", "--secret-file", secretFile); err != nil {
		return err
	}
	_ = os.Remove(secretFile)
	d.detail("sealed %q inside web-1's vTPM on host-a", secret)

	d.say("vtpmctl migrate web-1 --to host-b")
	out, err = d.vtpmctl(ctx, "migrate", "web-1", "--to", "host-b", "--socket", a.cfg.AdminSocketPath())
	if err != nil {
		return fmt.Errorf("migrate to host-b: %w", err)
	}
	d.detail("%s", indent(out))
	uri, err = b.hyp.VTPMURI(vm)
	if err != nil {
		return err
	}
	got, err := d.guest(ctx, uri, "unseal")
	if err != nil {
		return err
	}
	if strings.TrimSpace(got) != secret {
		return fmt.Errorf("unsealed %q on host-b, want %q", got, secret)
	}
	d.detail("the guest unseals %q on host-b", strings.TrimSpace(got))
	if _, _, err := a.daemon.Keys().Get(ctx, vm); !errors.Is(err, vtpm.ErrKeyNotFound) {
		return fmt.Errorf("host-a still holds the key of web-1 (%v)", err)
	}
	if dom, _ := a.hyp.Domain(ctx, vm); dom.State != hypervisor.StateAbsent {
		return fmt.Errorf("web-1 is still %s on host-a", dom.State)
	}
	out, _ = d.vtpmctl(ctx, "vm", "list", "--socket", a.cfg.AdminSocketPath())
	d.detail("host-a no longer holds a usable copy (key shredded, domain gone); vtpmctl vm list on host-a:\n     %s", indent(out))

	d.say("vtpmctl migrate web-1 --to host-c (host-c booted a tampered chain)")
	out, err = d.vtpmctl(ctx, "migrate", "web-1", "--to", "host-c", "--socket", b.cfg.AdminSocketPath())
	var ee *exec.ExitError
	if err == nil || !errors.As(errors.Unwrap(err), &ee) || ee.ExitCode() != 2 {
		return fmt.Errorf("migration to host-c was not refused with exit code 2: %v\n%s", err, out)
	}
	d.detail("refused (exit 2): %s", lastLine(err.Error()))
	if ok, _ := c.hyp.HasSecret(ctx, vm); ok {
		return errors.New("a vTPM secret was defined on host-c")
	}
	if files, _ := filepath.Glob(filepath.Join(c.cfg.DataDir, "keys", vm+"*")); len(files) != 0 {
		return fmt.Errorf("host-c holds key files: %v", files)
	}
	d.detail("host-c received no key bytes: no secret defined, no key file; web-1 keeps running on host-b")

	d.say("The audit trail on host-b: vtpmctl audit")
	out, err = d.vtpmctl(ctx, "audit", "--socket", b.cfg.AdminSocketPath())
	if err != nil {
		return err
	}
	d.detail("%s", indent(out))
	return nil
}

func indent(s string) string {
	return strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n     ")
}

// vtpmctl runs the real vtpmctl binary.
func (d *demo) vtpmctl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(d.bin, "vtpmctl"), args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("vtpmctl %s: %w: %s", args[0], err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

func (d *demo) provisionAgent(ctx context.Context, net *fake.Network, root, name, bootLog, rootsDir, enrollFile, pkiDir, policyFile string) (*migHost, error) {
	dir := filepath.Join(root, name)
	emu, err := emuhost.Start(ctx, emuhost.Config{Dir: filepath.Join(dir, "hosttpm"), Name: name})
	if err != nil {
		return nil, err
	}
	d.hosts = append(d.hosts, emu)
	if err := d.boot(ctx, emu, bootLog); err != nil {
		return nil, err
	}
	runDir, err := os.MkdirTemp("/tmp", "vtpmm-"+name+"-")
	if err != nil {
		return nil, err
	}
	cfg := agent.DefaultConfig()
	cfg.HostID, cfg.DataDir, cfg.RunDir, cfg.TPM = name, filepath.Join(dir, "data"), runDir, emu.URI()
	cfg.Vault.PCRs = "0,2,4,7"
	cfg.TLS = agent.TLSConfig{CA: filepath.Join(pkiDir, "ca.crt"), Cert: filepath.Join(pkiDir, name+".crt"), Key: filepath.Join(pkiDir, name+".key")}
	cfg.Attestation = agent.AttestationConfig{Policy: policyFile, Roots: []string{rootsDir}, Enrollments: enrollFile, EvidenceMaxAge: "60s"}
	cfg.EventLog = bootLog
	cfg.LogLevel = "warning"
	if _, err := agent.Init(ctx, cfg, agent.Options{}, agent.InitOptions{}); err != nil {
		return nil, err
	}
	// The operator trusts this host's TPM vendor CA and enrols its AK
	// (credential activation against its EK).
	if err := os.MkdirAll(rootsDir, 0o700); err != nil {
		return nil, err
	}
	for _, p := range []string{emu.RootCAPath(), emu.IntermediateCAPath()} {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(rootsDir, name+"-"+filepath.Base(p)), b, 0o600); err != nil {
			return nil, err
		}
	}
	if err := enrol(ctx, emu.URI(), name, enrollFile); err != nil {
		return nil, err
	}
	hyp, err := net.AddHost(ctx, fake.HostConfig{Name: name, Dir: filepath.Join(dir, "hypervisor")})
	if err != nil {
		return nil, err
	}
	lis, err := netListen()
	if err != nil {
		return nil, err
	}
	d.detail("%s: TPM booted from %s, vault sealed, AK and MK provisioned and enrolled, wire on %s",
		name, filepath.Base(bootLog), lis.Addr())
	return &migHost{name: name, cfg: cfg, emu: emu, hyp: hyp, wire: lis}, nil
}

func netListen() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }

// enrol runs credential activation against a host's EK and records it.
func enrol(ctx context.Context, uri, name, file string) error {
	tpm, err := vtpm.Open(ctx, uri)
	if err != nil {
		return err
	}
	defer tpm.Close()
	id, err := identity.LoadIdentity(ctx, tpm, identity.LoadOptions{})
	if err != nil {
		return err
	}
	ch, err := attest.NewActivationChallenge(rand.Reader, id.EK.Public, id.AK.Public)
	if err != nil {
		return err
	}
	answer, err := identity.ActivateCredential(ctx, tpm, id, ch)
	if err != nil {
		return err
	}
	if err := attest.VerifyActivation(ch, answer); err != nil {
		return err
	}
	return (&attest.FileEnrollments{Path: file}).Add(ctx, ch.Enrollment(name, time.Now()))
}

func (d *demo) startAgent2(ctx context.Context, net *fake.Network, h *migHost) error {
	log := logrus.New()
	log.SetFormatter(&logrus.JSONFormatter{})
	f, err := os.OpenFile(filepath.Join(d.work, h.name+"-vtpmd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	log.SetOutput(f)
	dm, err := agent.StartDaemon(ctx, h.cfg, agent.DaemonOptions{
		Options:      agent.Options{Log: log},
		Hypervisor:   h.hyp,
		WireListener: h.wire,
		Target: func(host string) (hypervisor.Target, error) {
			t, ok := net.Host(host)
			if !ok {
				return hypervisor.Target{}, fmt.Errorf("no hypervisor host %s", host)
			}
			return t.Target(), nil
		},
	})
	if err != nil {
		return fmt.Errorf("start vtpmd on %s: %w", h.name, err)
	}
	h.daemon, h.done = dm, make(chan error, 1)
	go func() { h.done <- dm.Serve(ctx); f.Close() }()
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(h.cfg.AdminSocketPath()); err == nil {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("vtpmd on %s: admin socket did not appear", h.name)
}

// createRunningVM creates a VM's vTPM with vtpmd and has the hypervisor
// define and start it with the VM key as its vTPM secret.
func (d *demo) createRunningVM(ctx context.Context, h *migHost, name string) (string, error) {
	vm, err := h.daemon.CreateVM(ctx, name, "")
	if err != nil {
		return "", err
	}
	k, _, err := h.daemon.Keys().Get(ctx, vm.UUID)
	if err != nil {
		return "", err
	}
	pass := k.Passphrase()
	k.Destroy()
	defer func() {
		for i := range pass {
			pass[i] = 0
		}
	}()
	if err := h.hyp.DefineSecret(ctx, vm.UUID, pass); err != nil {
		return "", err
	}
	state := filepath.Join(h.cfg.DataDir, "vms", vm.UUID, "tpm2")
	if err := h.hyp.DefineVTPMDomain(ctx, hypervisor.Domain{UUID: vm.UUID, Name: name}, state); err != nil {
		return "", err
	}
	return vm.UUID, h.hyp.StartDomain(ctx, vm.UUID)
}
