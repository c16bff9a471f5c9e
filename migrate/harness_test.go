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
func (f *fleet) addHost(name, bootLog string) *host {
	t, ctx := f.t, context.Background()
	t.Helper()
	dir := tempDir(t, "mig-"+name+"-")
	emu, err := emuhost.Start(ctx, emuhost.Config{Dir: filepath.Join(dir, "tpm"), Name: name})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := vtpm.Open(ctx, emu.URI())
	if err != nil {
		t.Fatal(err)
	}
	h := &host{f: f, name: name, dir: dir, emu: emu, meter: vtpm.NewMeter(raw, vtpm.ProfileNone), wire: &wireLog{}}
	h.audit = &memAudit{path: filepath.Join(dir, "audit.log")}
	if h.audit.log, err = audit.Open(h.audit.path, audit.Options{Host: name}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.audit.log.Close() })
	f.hosts[name] = h
	if err := emuhost.BootTPM(ctx, h.meter, readFile(t, bootLog), emu.PCRBanks()); err != nil {
		t.Fatal(err)
	}
	if h.ident, err = identity.Provision(ctx, h.meter, identity.ProvisionOptions{}); err != nil {
		t.Fatal(err)
	}
	tpmtest.TrustHostCA(t, f.roots, emu)
	tpmtest.Enrol(t, h.meter, h.ident, name, f.enr)
	if h.vault, err = vtpm.InitVault(ctx, h.meter, vtpm.VaultConfig{Dir: dir, PCRs: vtpm.PCRSelection{PCRs: []int{7}}}, vtpm.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.vault.Close)
	if h.hyp, err = f.net.AddHost(ctx, fake.HostConfig{Name: name, Dir: filepath.Join(dir, "hyp")}); err != nil {
		t.Fatal(err)
	}
	h.restart()
	return h
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
	h.node = migrate.NewNode(migrate.Config{
		Host: h.name, Keys: h.keys, TPM: h.meter, Identity: h.ident, Hypervisor: h.hyp, Ledger: h.ledger,
		Verifier:  &attest.Verifier{Roots: h.f.roots, Policy: h.f.policy, Enrollments: h.f.enr, Clock: time.Now},
		QuotePCRs: map[attest.Bank][]int{"sha256": quoted},
		EventLog:  readFile(t, bootLogOf(h)),
		Dial:      h.f.dial(h.name),
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
	return call(p, "Evidence", r, func(n *migrate.Node) (*migrate.EvidenceResponse, error) { return n.Evidence(ctx, r) })
}
func (p *testPeer) Prepare(ctx context.Context, r *migrate.PrepareRequest) (*migrate.PrepareResponse, error) {
	resp, err := call(p, "Prepare", r, func(n *migrate.Node) (*migrate.PrepareResponse, error) { return n.Prepare(ctx, r) })
	if err == nil && p.to.f.tamperPrepare != nil {
		p.to.f.tamperPrepare(resp)
	}
	return resp, err
}
func (p *testPeer) Finish(ctx context.Context, r *migrate.FinishRequest) (*migrate.FinishResponse, error) {
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
	k, _, err := h.keys.Create(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Destroy()
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
