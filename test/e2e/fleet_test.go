//go:build e2e

package e2e_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/test/lab"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

var quoted = []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}

// fleet is a set of e2e hosts, each with a vtpmm migrate.Node over its
// libvirt Hypervisor; they trust each other's TPM CAs and a golden policy
// built from the good boot log.
type fleet struct {
	t      *testing.T
	net    *lab.Network
	roots  *attest.RootStore
	enr    *attest.MemoryEnrollments
	policy *attest.Policy
	agents map[string]*agent
}

// agent is vtpmd's migration side on one host, built like
// migrate/harness_test.go does.
type agent struct {
	host   *lab.Host
	meter  *vtpm.Meter
	keys   *vtpm.KeyStore
	ident  *identity.Identity
	ledger *migrate.Ledger
	node   *migrate.Node
}

func logger(t *testing.T) logrus.FieldLogger {
	l := logrus.New()
	l.SetOutput(tWriter{t})
	l.SetLevel(logrus.InfoLevel)
	return l
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

func newFleet(ctx context.Context, t *testing.T) *fleet {
	t.Helper()
	n := newNetwork(ctx, t)
	l, err := attest.ParseEventLog(readFile(t, goodLog))
	if err != nil {
		t.Fatal(err)
	}
	p, err := attest.GoldenFromEventLog(l, "sha256", quoted)
	if err != nil {
		t.Fatal(err)
	}
	return &fleet{t: t, net: n, roots: attest.NewRootStore(), enr: &attest.MemoryEnrollments{}, policy: p,
		agents: map[string]*agent{}}
}

func readFile(t testing.TB, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// host starts an e2e host (no agent).
func (f *fleet) host(ctx context.Context, name, ip, bootLog string) *lab.Host {
	f.t.Helper()
	t0 := time.Now()
	h := lab.NewHost(ctx, f.t, lab.HostConfig{Network: f.net, Name: name, IP: ip, BootLog: bootLog, Log: logger(f.t)})
	f.t.Logf("host %s up in %v (libvirtd + host TPM)", name, time.Since(t0).Round(time.Millisecond))
	return h
}

// addAgent starts a host and provisions and enrols its vtpmm agent.
func (f *fleet) addAgent(ctx context.Context, name, ip, bootLog string) *agent {
	t := f.t
	t.Helper()
	h := f.host(ctx, name, ip, bootLog)
	raw, err := vtpm.Open(ctx, h.Emu.URI())
	if err != nil {
		t.Fatal(err)
	}
	a := &agent{host: h, meter: vtpm.NewMeter(raw, vtpm.ProfileNone)}
	t.Cleanup(func() { tpmtest.CheckNoLeaks(t, a.meter); a.meter.Close() })
	if a.ident, err = identity.Provision(ctx, a.meter, identity.ProvisionOptions{}); err != nil {
		t.Fatal(err)
	}
	tpmtest.TrustHostCA(t, f.roots, h.Emu)
	tpmtest.Enrol(t, a.meter, a.ident, name, f.enr)
	dir := filepath.Join(h.Dir, "vtpmd")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	vault, err := vtpm.InitVault(ctx, a.meter, vtpm.VaultConfig{Dir: dir, PCRs: vtpm.PCRSelection{PCRs: []int{7}}}, vtpm.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vault.Close)
	if a.ledger, err = migrate.OpenLedger(filepath.Join(dir, "ledger.db"), nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.ledger.Close() })
	if a.keys, err = vtpm.NewKeyStore(dir, name, vault, nil); err != nil {
		t.Fatal(err)
	}
	a.node = migrate.NewNode(migrate.Config{
		Host: name, Keys: a.keys, TPM: a.meter, Identity: a.ident, Hypervisor: h.Hyp, Ledger: a.ledger,
		Verifier:  &attest.Verifier{Roots: f.roots, Policy: f.policy, Enrollments: f.enr, Clock: time.Now},
		QuotePCRs: map[attest.Bank][]int{"sha256": quoted},
		EventLog:  readFile(t, bootLog),
		Dial: func(ctx context.Context, to string) (migrate.Peer, error) {
			if d, ok := f.agents[to]; ok {
				return d.node, nil
			}
			return nil, errors.New("no route to " + to)
		},
		Target: func(to string) (hypervisor.Target, error) {
			if d, ok := f.agents[to]; ok {
				return d.host.Target(), nil
			}
			return hypervisor.Target{}, errors.New("unknown host " + to)
		},
		Log: logger(t),
	})
	f.agents[name] = a
	return a
}

// createVM makes a VM as vtpmd would: a VM key in the key store, its
// passphrase as the ephemeral private libvirt secret, and a firmware-only
// 128 MiB domain whose encrypted vTPM libvirt creates at the first start.
func createVM(ctx context.Context, t *testing.T, keys *vtpm.KeyStore, h *lab.Host, name string) string {
	t.Helper()
	id := lab.NewUUID()
	k, _, err := keys.Create(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Destroy()
	if err := k.WithPassphrase(func(pass []byte) error { startVM(ctx, t, h, id, name, pass); return nil }); err != nil {
		t.Fatal(err)
	}
	return id
}

func startVM(ctx context.Context, t *testing.T, h *lab.Host, id, name string, pass []byte) {
	t.Helper()
	if err := h.Hyp.DefineSecret(ctx, id, pass); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := h.Hyp.DefineVM(ctx, libvirt.VMSpec{Name: name, UUID: id, TCG: !lab.KVM(), Start: true}); err != nil {
		t.Fatal(err)
	}
	t.Logf("VM %s defined and started on %s in %v (kvm=%v)", name, h.Name, time.Since(t0).Round(time.Millisecond), lab.KVM())
}

// wantState checks the VM's state on each host.
func wantState(ctx context.Context, t *testing.T, vm string, want map[*lab.Host]hypervisor.State) {
	t.Helper()
	for h, st := range want {
		d, err := h.Hyp.Domain(ctx, vm)
		if err != nil {
			t.Fatal(err)
		}
		if d.State != st {
			t.Errorf("VM %s on %s: state %s, want %s", vm, h.Name, d.State, st)
		}
	}
}
