package migrate_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/pki"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/wire"
	"github.com/vtpmm/vtpmm/vtpm"
)

func methodsOf(rs []recorded) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.method)
	}
	return out
}

// TestWireMigration migrates A->B and back with every call on the agent
// wire (mTLS on loopback), then replays and forges requests at B.
func TestWireMigration(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	w := newWireNet(f, a, b)
	vm := a.createVM("vm1")
	secret := []byte("tenant disk key over the wire")
	a.guestSeal(vm, secret)

	mctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	start := time.Now()
	res, err := a.node.Migrate(mctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil)
	if err != nil {
		t.Fatalf("migrate A->B over the wire: %v", err)
	}
	t.Logf("A->B over the wire in %v, round trips %d+%d", time.Since(start).Round(time.Millisecond), res.RoundTrips.Before, res.RoundTrips.After)
	if res.RoundTrips.Before != 2 || res.RoundTrips.After != 1 || res.Warm {
		t.Fatalf("result %+v", res)
	}
	if got := b.guestUnseal(vm); !bytes.Equal(got, secret) {
		t.Fatalf("unsealed %q on B, want %q", got, secret)
	}
	f.checkSingleOwner(vm, "host-b")
	recvd := w.recs["host-b"].all()
	if m := methodsOf(recvd); strings.Join(m, ",") != "Evidence,Prepare,Finish" {
		t.Fatalf("B received %v", m)
	}
	prep, ok := recvd[1].req.(*migrate.PrepareRequest)
	if !ok || prep.Source != "host-a" || prep.Dest != "host-b" {
		t.Fatalf("B's Prepare: %#v", recvd[1].req)
	}

	if _, err := b.node.Migrate(mctx, migrate.Request{VMs: []string{vm}, Dest: "host-a"}, nil); err != nil {
		t.Fatalf("migrate B->A over the wire: %v", err)
	}
	if got := a.guestUnseal(vm); !bytes.Equal(got, secret) {
		t.Fatalf("unsealed %q back on A", got)
	}
	f.checkSingleOwner(vm, "host-a")

	// Errors across the wire keep their sentinels.
	peer, err := w.clients["host-a"].Dial(ctx, "host-b")
	if err != nil {
		t.Fatal(err)
	}
	_, err = peer.Prepare(mctx, prep)
	if !errors.Is(err, migrate.ErrReplay) || status.Code(err) != codes.AlreadyExists {
		t.Fatalf("replayed Prepare over the wire: %v (%v), want ErrReplay", err, status.Code(err))
	}
	t.Logf("replay: %v", err)
	forged := *prep
	forged.TxID = strings.Repeat("ab", 16)
	if _, err := peer.Prepare(mctx, &forged); !errors.Is(err, vtpm.ErrWrongKey) {
		t.Fatalf("Prepare with a rewritten transaction id: %v, want ErrWrongKey", err)
	}
	_, err = peer.Finish(mctx, &migrate.FinishRequest{Version: migrate.ProtocolVersion, TxID: strings.Repeat("cd", 16), Source: "host-a", Abort: []string{vm}})
	if !errors.Is(err, migrate.ErrUnknownTx) || status.Code(err) != codes.NotFound {
		t.Fatalf("Finish of an unknown transaction: %v", err)
	}
	bad := *prep
	bad.Version = 99
	if _, err := peer.Prepare(mctx, &bad); !errors.Is(err, migrate.ErrBadMessage) || status.Code(err) != codes.InvalidArgument {
		t.Fatalf("Prepare of version 99: %v", err)
	}

	// A valid certificate of host-x, claiming to be host-a.
	w.issue("host-x")
	xp, err := w.client("host-x").Dial(ctx, "host-b")
	if err != nil {
		t.Fatal(err)
	}
	_, err = xp.Prepare(mctx, prep)
	if status.Code(err) != codes.PermissionDenied || !errors.Is(err, wire.ErrUnauthorized) {
		t.Fatalf("host-x claiming host-a: %v (%v), want PermissionDenied", err, status.Code(err))
	}
	if !strings.Contains(err.Error(), "host-x") || !strings.Contains(err.Error(), "host-a") {
		t.Fatalf("refusal does not name both hosts: %v", err)
	}
	t.Logf("impersonation: %v", err)
	_, err = xp.Status(mctx, &migrate.StatusRequest{TxID: prep.TxID, From: "host-a"})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("Status from host-x claiming host-a: %v", err)
	}
	if _, err := xp.Status(mctx, &migrate.StatusRequest{TxID: prep.TxID, From: "host-x"}); !errors.Is(err, migrate.ErrBadMessage) {
		t.Fatalf("host-x asking honestly about A's transaction: %v", err) // authorized, then refused by the node
	}

	// A certificate from another CA: the handshake fails, B sees nothing.
	before := len(w.recs["host-b"].all())
	otherDir := tempDir(t, "wire-other-ca-")
	other, err := pki.InitCA(filepath.Join(otherDir, "ca"), pki.CAOptions{Name: "another CA"})
	if err != nil {
		t.Fatal(err)
	}
	oc, ok2, err := other.IssueToDir("host-a", otherDir, pki.IssueOptions{})
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := tls.LoadX509KeyPair(oc, ok2)
	if err != nil {
		t.Fatal(err)
	}
	oclient := wire.NewClient(func(host string) (*tls.Config, error) {
		cert, key := w.certFiles("host-a")
		cfg, err := pki.ClientTLS(w.caFile(), cert, key, host) // trusts B
		if err != nil {
			return nil, err
		}
		cfg.Certificates = nil
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &foreign, nil }
		return cfg, nil
	}, func(string) (string, error) { return w.proxies["host-b"].addr(), nil })
	defer oclient.Close()
	op, err := oclient.Dial(ctx, "host-b")
	if err != nil {
		t.Fatal(err)
	}
	_, err = op.Finish(mctx, &migrate.FinishRequest{Version: migrate.ProtocolVersion, TxID: prep.TxID, Source: "host-a", Abort: []string{vm}})
	if !errors.Is(err, migrate.ErrPeer) || status.Code(err) != codes.Unavailable {
		t.Fatalf("certificate of another CA: %v (%v)", err, status.Code(err))
	}
	t.Logf("foreign CA: %v", err)
	if got := len(w.recs["host-b"].all()); got != before {
		t.Fatalf("B decoded %d requests from a client of another CA", got-before)
	}
	f.checkSingleOwner(vm, "host-a")
}

// checkRunsOnce fails unless exactly one host runs vm and that host holds
// its key (active, or PENDING while the transaction is open). It returns
// that host.
func checkRunsOnce(t *testing.T, f *fleet, vm string) string {
	t.Helper()
	ctx := context.Background()
	var running []string
	for name, h := range f.hosts {
		if d, err := h.hyp.Domain(ctx, vm); err == nil && d.State == hypervisor.StateRunning {
			running = append(running, name)
		}
	}
	if len(running) != 1 {
		t.Fatalf("VM %s runs on %v", vm, running)
	}
	h := f.hosts[running[0]]
	if _, _, err := h.keys.Get(ctx, vm); err == nil {
		return running[0]
	}
	if _, ok := h.node.Incoming(vm); ok {
		return running[0]
	}
	t.Fatalf("VM %s runs on %s, which holds no key for it", vm, running[0])
	return ""
}

// TestWireNetworkCut cuts the network between source and destination at
// each request of the protocol, before and after the destination handled
// it, by dropping or by stalling the connection. The migration fails in
// bounded time with ErrPeer or ErrUnresolved, the VM runs on exactly one
// host with its key, and once the network heals Reconcile on both nodes
// leaves a single owner whose vTPM still unseals the guest's secret.
func TestWireNetworkCut(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	w := newWireNet(f, a, b)
	vm := a.createVM("vm1")
	secret := []byte("sealed before any cut")
	a.guestSeal(vm, secret)
	const deadline = 4 * time.Second
	owner, other := a, b
	for _, method := range []string{wire.MethodEvidence, wire.MethodPrepare, wire.MethodFinish} {
		for _, when := range []cutWhen{cutBefore, cutAfter} {
			for _, mode := range []cutMode{drop, stall} {
				t.Run(fmt.Sprintf("%s/%s/%s", method, when, mode), func(t *testing.T) {
					owner.node.ForgetEvidence(other.name) // cold: Evidence is sent
					px := w.proxies[other.name]
					px.armCut(method, when, mode)
					mctx, cancel := context.WithTimeout(ctx, deadline)
					start := time.Now()
					_, err := owner.node.Migrate(mctx, migrate.Request{VMs: []string{vm}, Dest: other.name}, nil)
					elapsed := time.Since(start)
					cancel()
					if !px.didFire() {
						px.heal()
						t.Fatalf("the cut never fired (migration: %v)", err)
					}
					if err == nil {
						t.Fatal("migration succeeded across a cut")
					}
					if !errors.Is(err, migrate.ErrPeer) && !errors.Is(err, migrate.ErrUnresolved) {
						t.Fatalf("error is neither ErrPeer nor ErrUnresolved: %v", err)
					}
					if elapsed > deadline+2*time.Second {
						t.Fatalf("migration took %v with a deadline of %v", elapsed, deadline)
					}
					t.Logf("%s %s -> %s cut %s %s (%v): %v", method, owner.name, other.name, when, mode, elapsed.Round(time.Millisecond), err)
					runs := checkRunsOnce(t, f, vm)

					px.heal()
					var rerr error
					for round := 0; round < 20; round++ {
						rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
						rerr = errors.Join(owner.node.Reconcile(rctx), other.node.Reconcile(rctx))
						rcancel()
						if rerr == nil {
							break
						}
						t.Logf("reconcile round %d: %v", round, rerr)
						time.Sleep(300 * time.Millisecond)
					}
					if rerr != nil {
						t.Fatalf("not reconciled after the network healed: %v", rerr)
					}
					want := owner
					if method == wire.MethodFinish { // the hypervisor had migrated the VM
						want = other
					}
					if runs != want.name {
						t.Fatalf("VM ran on %s during the cut, want %s", runs, want.name)
					}
					f.checkSingleOwner(vm, want.name)
					if got := want.guestUnseal(vm); !bytes.Equal(got, secret) {
						t.Fatalf("unsealed %q on %s", got, want.name)
					}
					if want != owner {
						owner, other = other, owner
					}
				})
			}
		}
	}
	// The wire still works after all that.
	mctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if _, err := owner.node.Migrate(mctx, migrate.Request{VMs: []string{vm}, Dest: other.name}, nil); err != nil {
		t.Fatalf("migration after the cuts: %v", err)
	}
	f.checkSingleOwner(vm, other.name)
}

// TestWireRefusedDestinationGetsOnlyEvidence migrates to host-c, whose boot
// fails the policy: host-c's server decodes one Evidence request and no
// Prepare, and no form of the VM key is in anything it received (the
// decoded requests, or the bytes its proxy forwarded, which TLS encrypts).
func TestWireRefusedDestinationGetsOnlyEvidence(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, c := f.addHost("host-a", goodLog), f.addHost("host-c", badLog)
	w := newWireNet(f, a, c)
	vm := a.createVM("vm1")
	pass := a.passphrase(vm)
	raw, _ := hex.DecodeString(pass)
	forms := [][]byte{raw, []byte(pass), []byte(base64.StdEncoding.EncodeToString(raw))}

	w.proxies["host-c"].startCapture()
	mctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	_, err := a.node.Migrate(mctx, migrate.Request{VMs: []string{vm}, Dest: "host-c"}, nil)
	var re *attest.RefusalError
	if !errors.Is(err, migrate.ErrRefused) || !errors.As(err, &re) || re.Rule != attest.RulePCRPolicy || !strings.Contains(err.Error(), "host-c") {
		t.Fatalf("migrate to host-c: %v, want ErrRefused by rule pcr-policy naming host-c", err)
	}
	t.Logf("refusal: %v", err)

	recvd := w.recs["host-c"].all()
	if m := methodsOf(recvd); len(m) != 1 || m[0] != wire.MethodEvidence {
		t.Fatalf("host-c received %v, want only Evidence", m)
	}
	if er, ok := recvd[0].req.(*migrate.EvidenceRequest); !ok || er.Source != "host-a" {
		t.Fatalf("host-c's request: %#v", recvd[0].req)
	}
	for _, r := range recvd {
		body, _ := json.Marshal(r.req)
		for _, form := range forms {
			if bytes.Contains(body, form) {
				t.Fatalf("key bytes reached host-c in %s", r.method)
			}
		}
	}
	captured := w.proxies["host-c"].capture()
	if len(captured) < 1000 {
		t.Fatalf("captured only %d bytes", len(captured))
	}
	for _, form := range forms {
		if bytes.Contains(captured, form) {
			t.Fatal("key bytes in the traffic to host-c")
		}
	}
	if bytes.Contains(captured, []byte(`"source"`)) || bytes.Contains(captured, []byte("EvidenceRequest")) {
		t.Fatal("the traffic to host-c is not encrypted")
	}
	t.Logf("%d bytes to and from host-c, none of them key material", len(captured))
	for _, h := range []*host{a, c} {
		logs := h.logs.Bytes()
		for _, form := range forms {
			if bytes.Contains(logs, form) {
				t.Fatalf("key bytes in %s's node or wire logs", h.name)
			}
		}
	}
	if ok, _ := c.hyp.HasSecret(ctx, vm); ok {
		t.Fatal("a secret was defined on host-c")
	}
	f.checkSingleOwner(vm, "host-a")
}
