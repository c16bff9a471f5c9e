package migrate_test

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/fake"
	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/internal/fixtures"
	"github.com/vtpmm/vtpmm/internal/guestseal"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/emuhost"
	"github.com/vtpmm/vtpmm/vtpm/identity"
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// The boot logs (internal/fixtures) the emulated hosts replay.
const (
	goodLog = "eventlogs/gce-cos-85.eventlog.bin"
	badLog  = "eventlogs/ubuntu-2104-no-secure-boot.bin"
)

var quoted = []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}

// fleet is a set of emulated hosts that trust each other's TPM CAs and a
// policy built from the good boot log.
type fleet struct {
	t       testing.TB
	net     *fake.Network
	roots   *attest.RootStore
	enr     *attest.MemoryEnrollments
	policy  *attest.Policy
	hosts   map[string]*host
	crashMu sync.Mutex
	crash   map[string]migrate.CrashHook
	// maxAge is the nodes' EvidenceMaxAge (0: the default 60 s; negative: always cold).
	maxAge time.Duration
	// pullLease is the nodes' PullLease (0: the default).
	pullLease time.Duration
	// tamperPrepare, when set, rewrites every Prepare response on its way back.
	tamperPrepare func(*migrate.PrepareResponse)
	// registry, when set (useRegistry), gives each host its client of the
	// fleet registry; op is the operator's (enrolments).
	registry func(host string) migrate.Registry
	regs     map[string]migrate.Registry
	op       registry.Fleet
	// onPrepare and onFinish, when set, run on the way to a node's
	// Prepare and Finish (a source's registry steps, for a destination
	// with a registry); an error is the call's.
	onPrepare func(from, to *host, r *migrate.PrepareRequest) error
	onFinish  func(from, to *host, r *migrate.FinishRequest) error
	// onEvidence, when set, rewrites the evidence a host answers with (a
	// rogue host relaying another's).
	onEvidence func(from, to *host, r *migrate.EvidenceRequest, resp *migrate.EvidenceResponse) (*migrate.EvidenceResponse, error)
}

// host is one emulated host: TPM, vault, key store, identity, ledger,
// fake hypervisor and the migrate.Node on top.
type host struct {
	f      *fleet
	name   string
	dir    string
	emu    *emuhost.Host
	meter  *vtpm.Meter
	vault  *vtpm.Vault
	keys   *vtpm.KeyStore
	ident  *identity.Identity
	hyp    *fake.Host
	ledger *migrate.Ledger
	node   *migrate.Node
	audit  *memAudit
	down   bool
	wire   *wireLog
	logs   *syncBuffer // the node's JSON logs, at trace level
	// reg, when set before restart, is the node's registry.
	reg migrate.Registry
	// registered, when set before restart, is the node's Config.Registered.
	registered func(context.Context) error
	// anchor is the host's rollback anchor, opened and checked at every
	// restart as vtpmd does (docs/anchor.md).
	anchor *vtpm.Anchor
}

func newFleet(t testing.TB) *fleet {
	t.Helper()
	l, err := attest.ParseEventLog(readFile(t, goodLog))
	if err != nil {
		t.Fatal(err)
	}
	p, err := attest.GoldenFromEventLog(l, "sha256", quoted)
	if err != nil {
		t.Fatal(err)
	}
	f := &fleet{t: t, net: fake.NewNetwork(), roots: attest.NewRootStore(), enr: &attest.MemoryEnrollments{},
		policy: p, hosts: map[string]*host{}, crash: map[string]migrate.CrashHook{}}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_ = f.net.Close(ctx)
		for _, h := range f.hosts {
			if h.ledger != nil {
				h.ledger.Close()
			}
			tpmtest.CheckNoLeaks(t, h.meter)
			h.meter.Close()
			_ = h.emu.Stop(ctx)
		}
	})
	return f
}

func readFile(t testing.TB, p string) []byte {
	t.Helper()
	b, err := fixtures.File(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func tempDir(t testing.TB, prefix string) string {
	t.Helper()
	d, err := os.MkdirTemp("/tmp", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// addHost provisions a host booted from bootLog and enrols it.
func (f *fleet) addHost(name, bootLog string) *host { return f.addHostEnrolled(name, bootLog, true) }

// addHostEnrolled provisions a host, enrolled (in the fleet's one enrolment
// store every node trusts) or not.
func (f *fleet) addHostEnrolled(name, bootLog string, enrol bool) *host {
	t, ctx := f.t, context.Background()
	t.Helper()
	h := &host{f: f, name: name, wire: &wireLog{}}
	h.provision(bootLog, enrol)
	var err error
	h.audit = &memAudit{path: filepath.Join(h.dir, "audit.log")}
	if h.audit.log, err = audit.Open(h.audit.path, audit.Options{Host: name}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.audit.log.Close() })
	f.hosts[name] = h
	if enrol && f.registry != nil {
		registrytest.Enroll(t, f.op, name)
	}
	if f.registry != nil {
		f.regs[name] = f.registry(name)
	}
	if h.hyp, err = f.net.AddHost(ctx, fake.HostConfig{Name: name, Dir: filepath.Join(h.dir, "hyp")}); err != nil {
		t.Fatal(err)
	}
	h.restart()
	return h
}

// provision gives h a new data directory and a new TPM booted from
// bootLog: its identity (enrolled, if enrol, in the enrolment store every
// node trusts), vault and rollback anchor, as vtpmd init does.
func (h *host) provision(bootLog string, enrol bool) {
	t, ctx, f := h.f.t, context.Background(), h.f
	t.Helper()
	h.dir = tempDir(t, "mig-"+h.name+"-")
	var err error
	if h.emu, err = emuhost.Start(ctx, emuhost.Config{Dir: filepath.Join(h.dir, "tpm"), Name: h.name}); err != nil {
		t.Fatal(err)
	}
	raw, err := vtpm.Open(ctx, h.emu.URI())
	if err != nil {
		t.Fatal(err)
	}
	h.meter = vtpm.NewMeter(raw, vtpm.ProfileNone)
	if err := emuhost.BootTPM(ctx, h.meter, readFile(t, bootLog), h.emu.PCRBanks()); err != nil {
		t.Fatal(err)
	}
	if h.ident, err = identity.Provision(ctx, h.meter, identity.ProvisionOptions{}); err != nil {
		t.Fatal(err)
	}
	tpmtest.TrustHostCA(t, f.roots, h.emu)
	if enrol {
		tpmtest.Enrol(t, h.meter, h.ident, h.name, f.enr)
	}
	if h.vault, err = vtpm.InitVault(ctx, h.meter, vtpm.VaultConfig{Dir: h.dir, PCRs: vtpm.PCRSelection{PCRs: []int{7}}}, vtpm.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.vault.Close)
	a, err := vtpm.InitAnchor(ctx, h.meter, h.vault, vtpm.AnchorConfig{Dir: h.dir}, vtpm.Facts{}, vtpm.AnchorInitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	a.Close()
}

// restart builds the agent side again over the same files, as after a
// crash of vtpmd; the TPM, the vault key (re-unsealed) and the hypervisor
// keep running.
func (h *host) restart() {
	t := h.f.t
	t.Helper()
	if h.ledger != nil {
		h.ledger.Close()
	}
	var err error
	if h.ledger, err = migrate.OpenLedger(filepath.Join(h.dir, "ledger.db"), nil); err != nil {
		t.Fatal(err)
	}
	if h.keys, err = vtpm.NewKeyStore(h.dir, h.name, h.vault, nil); err != nil {
		t.Fatal(err)
	}
	h.openAnchor()
	reg := h.reg // a test's own client, else the fleet's (useRegistry)
	if reg == nil {
		reg = h.f.regs[h.name]
	}
	h.node = migrate.NewNode(migrate.Config{
		Host: h.name, Keys: h.keys, TPM: h.meter, Identity: h.ident, Hypervisor: h.hyp, Ledger: h.ledger, Registry: reg,
		Anchor:      harnessAnchor{h},
		Verifier:    &attest.Verifier{Roots: h.f.roots, Policy: h.f.policy, Enrollments: h.f.enr, Clock: time.Now},
		Enrollments: h.f.enr,
		QuotePCRs:   map[attest.Bank][]int{"sha256": quoted},
		EventLog:    readFile(t, bootLogOf(h)),
		Dial:        h.f.dial(h.name),
		Target: func(name string) (hypervisor.Target, error) {
			if d, ok := h.f.hosts[name]; ok {
				return d.hyp.Target(), nil
			}
			return hypervisor.Target{}, errors.New("unknown host " + name)
		},
		Log:            h.logger(),
		Crash:          func(p migrate.CrashPoint) error { return h.f.crashHook(h.name, p) },
		EvidenceMaxAge: h.f.maxAge,
		PullLease:      h.f.pullLease,
		Audit:          h.audit,
		Registered:     h.registered,
	})
	h.down = false
}

type syncBuffer struct {
	mu sync.Mutex
	b  []byte
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.b = append(s.b, p...)
	return len(p), nil
}

func (s *syncBuffer) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.b...)
}

func (h *host) logger() logrus.FieldLogger {
	if h.logs == nil {
		h.logs = &syncBuffer{}
	}
	l := logrus.New()
	l.SetOutput(h.logs)
	l.SetFormatter(&logrus.JSONFormatter{})
	l.SetLevel(logrus.TraceLevel)
	return l
}

func bootLogOf(h *host) string {
	if h.name == "host-c" {
		return badLog
	}
	return goodLog
}

func (f *fleet) crashHook(host string, p migrate.CrashPoint) error {
	f.crashMu.Lock()
	hook := f.crash[host]
	f.crashMu.Unlock()
	if hook == nil {
		return nil
	}
	err := hook(p)
	if err != nil {
		f.hosts[host].down = true // the process is gone
	}
	return err
}

// dial returns peers as seen from host from: calls go to the current node
// of the peer, fail while it is down, and are recorded as JSON.
func (f *fleet) dial(from string) migrate.Dialer {
	return func(ctx context.Context, to string) (migrate.Peer, error) {
		h, ok := f.hosts[to]
		if !ok {
			return nil, errors.New("no route to " + to)
		}
		return &testPeer{from: f.hosts[from], to: h}, nil
	}
}

var errDown = errors.New("connection refused (agent down)")

type testPeer struct{ from, to *host }

func call[Req, Resp any](p *testPeer, method string, req Req, f func(*migrate.Node) (Resp, error)) (Resp, error) {
	var zero Resp
	if p.to.down || p.from.down {
		return zero, errDown
	}
	p.to.wire.record(method, req)
	resp, err := f(p.to.node)
	if err == nil {
		p.to.wire.record(method+"-response", resp)
	}
	return resp, err
}

func (p *testPeer) Evidence(ctx context.Context, r *migrate.EvidenceRequest) (*migrate.EvidenceResponse, error) {
	resp, err := call(p, "Evidence", r, func(n *migrate.Node) (*migrate.EvidenceResponse, error) { return n.Evidence(ctx, r) })
	if hook := p.to.f.onEvidence; hook != nil && err == nil {
		return hook(p.from, p.to, r, resp)
	}
	return resp, err
}
func (p *testPeer) Prepare(ctx context.Context, r *migrate.PrepareRequest) (*migrate.PrepareResponse, error) {
	if hook := p.to.f.onPrepare; hook != nil && !p.to.down && !p.from.down {
		if err := hook(p.from, p.to, r); err != nil {
			return nil, err
		}
	}
	resp, err := call(p, "Prepare", r, func(n *migrate.Node) (*migrate.PrepareResponse, error) { return n.Prepare(ctx, r) })
	if err == nil && p.to.f.tamperPrepare != nil {
		p.to.f.tamperPrepare(resp)
	}
	return resp, err
}
func (p *testPeer) Finish(ctx context.Context, r *migrate.FinishRequest) (*migrate.FinishResponse, error) {
	if hook := p.to.f.onFinish; hook != nil && !p.to.down && !p.from.down {
		if err := hook(p.from, p.to, r); err != nil {
			return nil, err
		}
	}
	return call(p, "Finish", r, func(n *migrate.Node) (*migrate.FinishResponse, error) { return n.Finish(ctx, r) })
}
func (p *testPeer) Status(ctx context.Context, r *migrate.StatusRequest) (*migrate.StatusResponse, error) {
	return call(p, "Status", r, func(n *migrate.Node) (*migrate.StatusResponse, error) { return n.Status(ctx, r) })
}

// wireLog records every message a host received or sent back, as JSON.
type wireLog struct {
	mu   sync.Mutex
	msgs []wireMsg
}

type wireMsg struct {
	Method string
	Body   []byte
}

func (w *wireLog) record(method string, v any) {
	b, _ := json.Marshal(v)
	w.mu.Lock()
	w.msgs = append(w.msgs, wireMsg{method, b})
	w.mu.Unlock()
}

func (w *wireLog) methods() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for _, m := range w.msgs {
		out = append(out, m.Method)
	}
	return out
}

// memAudit keeps events in memory for counting and appends them to the
// host's real hash-chained audit log.
type memAudit struct {
	mu     sync.Mutex
	events []migrate.AuditEvent
	log    *audit.Log
	path   string
}

func (a *memAudit) Audit(ctx context.Context, e migrate.AuditEvent) error {
	a.mu.Lock()
	a.events = append(a.events, e)
	a.mu.Unlock()
	if a.log == nil {
		return nil
	}
	return a.log.Append(ctx, audit.Record{Event: e.Event, VM: e.VM, Peer: e.Peer, Generation: e.Generation,
		Rule: e.Rule, Detail: "tx=" + e.TxID + " " + e.Detail})
}

// verify checks the host's audit chain from disk.
func (a *memAudit) verify(t testing.TB) int {
	t.Helper()
	fh, err := os.Open(a.path)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	sum, err := audit.Verify(fh)
	if err != nil {
		t.Fatalf("audit log %s: %v", a.path, err)
	}
	return sum.Records
}

func (a *memAudit) count(event audit.Event) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, e := range a.events {
		if e.Event == event {
			n++
		}
	}
	return n
}

// createVM makes a VM on h as vtpmd does (key + encrypted swtpm state),
// defines it in h's hypervisor with its secret, and starts it.
func (h *host) createVM(name string) string {
	t, ctx := h.f.t, context.Background()
	t.Helper()
	id := newUUID(t)
	ticket, err := h.anchor.Advance(ctx, []vtpm.Change{{VMID: id, Generation: 1}})
	if err != nil {
		t.Fatal(err)
	}
	k, _, err := h.keys.Create(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Destroy()
	if err := (harnessAnchor{h}).Settle(ctx, ticket); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(h.dir, "vms", id, "tpm2")
	err = k.WithPassphrase(func(pass []byte) error {
		if err := swtpm.Setup(ctx, swtpm.SetupConfig{StateDir: state, VMID: id, VMName: name, Passphrase: pass, CADir: filepath.Join(h.dir, "vm-ca")}); err != nil {
			return err
		}
		return h.hyp.DefineSecret(ctx, id, pass)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.hyp.DefineVTPMDomain(ctx, hypervisor.Domain{UUID: id, Name: name}, state); err != nil {
		t.Fatal(err)
	}
	if err := h.hyp.StartDomain(ctx, id); err != nil {
		t.Fatal(err)
	}
	if reg := h.f.regs[h.name]; reg != nil {
		if _, err := reg.(registry.Ownership).CreateVM(ctx, id, h.name); err != nil {
			t.Fatal(err)
		}
	}
	return id
}

func newUUID(t testing.TB) string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmtUUID(b)
}

// guestSeal seals secret inside the VM's vTPM wherever it runs.
func (h *host) guestSeal(vm string, secret []byte) {
	h.f.t.Helper()
	h.withVTPM(vm, func(ctx context.Context, tpm vtpmConn) error { return guestseal.Seal(ctx, tpm, secret, []int{16}) })
}

// guestUnseal unseals it.
func (h *host) guestUnseal(vm string) []byte {
	h.f.t.Helper()
	var out []byte
	h.withVTPM(vm, func(ctx context.Context, tpm vtpmConn) error {
		var err error
		out, err = guestseal.Unseal(ctx, tpm)
		return err
	})
	return out
}

func (p *testPeer) Identity(ctx context.Context, r *migrate.IdentityRequest) (*migrate.IdentityResponse, error) {
	return call(p, "Identity", r, func(n *migrate.Node) (*migrate.IdentityResponse, error) { return n.Identity(ctx, r) })
}
func (p *testPeer) Pull(ctx context.Context, r *migrate.PullRequest) (*migrate.PullResponse, error) {
	return call(p, "Pull", r, func(n *migrate.Node) (*migrate.PullResponse, error) { return n.Pull(ctx, r) })
}

func (p *testPeer) Activate(ctx context.Context, r *migrate.ActivateRequest) (*migrate.ActivateResponse, error) {
	return call(p, "Activate", r, func(n *migrate.Node) (*migrate.ActivateResponse, error) { return n.Activate(ctx, r) })
}

// passphrase is a copy of the VM key's passphrase, for tests that look for
// it where it must not be.
func (h *host) passphrase(vm string) string {
	h.f.t.Helper()
	var out string
	if _, err := h.keys.WithPassphrase(context.Background(), vm, func(p []byte) error { out = string(p); return nil }); err != nil {
		h.f.t.Fatal(err)
	}
	return out
}

// pendingKeyFiles lists the VM's PENDING key files left in h's key store.
func (h *host) pendingKeyFiles(vm string) []string {
	m, _ := filepath.Glob(filepath.Join(h.dir, "keys", vm+".*.pending"))
	return m
}

// useRegistry gives every host added from now on a client of a fleet
// registry and enrols it there: "etcd" is a real one-member etcd cluster
// (registrytest.Start), "fake" the registry's fake (which follows the same
// rules) for injecting failures. It returns the fake (nil for etcd).
func (f *fleet) useRegistry(kind string) *registrytest.Fake {
	t := f.t
	t.Helper()
	f.regs = map[string]migrate.Registry{}
	switch kind {
	case "etcd":
		c := registrytest.Start(t, registrytest.Options{Members: 1})
		f.op = c.Open(t, "root")
		f.registry = func(host string) migrate.Registry {
			cfg := c.Config(host)
			cfg.NoFollow = false // the last view follows other hosts' changes, as vtpmd's does
			return c.OpenConfig(t, cfg)
		}
		return nil
	case "fake":
		fk := registrytest.NewFake()
		f.op = fk.Client("root")
		f.registry = func(host string) migrate.Registry { return fk.Client(host) }
		return fk
	}
	t.Fatalf("registry kind %q", kind)
	return nil
}

// checkRegistry checks that the registry shows want owning vm at the
// generation of its key, with no transaction open.
func (f *fleet) checkRegistry(vm, want string) {
	t, ctx := f.t, context.Background()
	t.Helper()
	if f.regs == nil {
		return
	}
	_, gen, err := f.hosts[want].keys.Get(ctx, vm)
	if err != nil {
		t.Fatalf("%s: key of %s: %v", want, vm, err)
	}
	v, err := f.regs[want].VMs(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	r, ok := v.VMs[vm]
	if !ok || r.Owner != want || r.Generation != gen || r.Tx != nil {
		t.Fatalf("registry record of %s: %+v (present %v); want %s at generation %d with nothing open", vm, r, ok, want, gen)
	}
}
