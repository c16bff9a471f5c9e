package wire

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vtpmm/vtpmm/internal/pki"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/vtpm"
)

// fakePeer answers every call with the function set for it.
type fakePeer struct {
	mu     sync.Mutex
	status func(ctx context.Context, r *migrate.StatusRequest) (*migrate.StatusResponse, error)
	calls  int
}

func (f *fakePeer) Evidence(ctx context.Context, r *migrate.EvidenceRequest) (*migrate.EvidenceResponse, error) {
	return &migrate.EvidenceResponse{Evidence: []byte(`{"host":"x"}`)}, nil
}
func (f *fakePeer) Identity(ctx context.Context, r *migrate.IdentityRequest) (*migrate.IdentityResponse, error) {
	return &migrate.IdentityResponse{Host: "host-b", EKPublic: []byte{1}, AKPublic: []byte{2}}, nil
}
func (f *fakePeer) Activate(ctx context.Context, r *migrate.ActivateRequest) (*migrate.ActivateResponse, error) {
	return &migrate.ActivateResponse{Secret: r.Challenge.AKName}, nil
}
func (f *fakePeer) Pull(ctx context.Context, r *migrate.PullRequest) (*migrate.PullResponse, error) {
	return &migrate.PullResponse{VMs: r.VMs}, nil
}
func (f *fakePeer) Prepare(ctx context.Context, r *migrate.PrepareRequest) (*migrate.PrepareResponse, error) {
	return &migrate.PrepareResponse{TxID: r.TxID}, nil
}
func (f *fakePeer) Finish(ctx context.Context, r *migrate.FinishRequest) (*migrate.FinishResponse, error) {
	return &migrate.FinishResponse{TxID: r.TxID, State: "committed", Committed: r.Commit}, nil
}
func (f *fakePeer) Status(ctx context.Context, r *migrate.StatusRequest) (*migrate.StatusResponse, error) {
	f.mu.Lock()
	f.calls++
	fn := f.status
	f.mu.Unlock()
	if fn != nil {
		return fn(ctx, r)
	}
	return &migrate.StatusResponse{TxID: r.TxID, Known: true, State: "pending", Running: r.VMs}, nil
}

func (f *fakePeer) setStatus(fn func(ctx context.Context, r *migrate.StatusRequest) (*migrate.StatusResponse, error)) {
	f.mu.Lock()
	f.status = fn
	f.mu.Unlock()
}

// pkiDir is a CA and host certificates in a temporary directory.
type pkiDir struct {
	dir string
	ca  *pki.CA
}

func newPKI(t *testing.T, name string, hosts ...string) *pkiDir {
	t.Helper()
	dir := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), pki.CAOptions{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	p := &pkiDir{dir: dir, ca: ca}
	for _, h := range hosts {
		if _, _, err := ca.IssueToDir(h, filepath.Join(dir, "hosts"), pki.IssueOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

func (p *pkiDir) caFile() string { return filepath.Join(p.dir, "ca", pki.CACertFile) }
func (p *pkiDir) files(host string) (string, string) {
	return filepath.Join(p.dir, "hosts", host+".crt"), filepath.Join(p.dir, "hosts", host+".key")
}

func (p *pkiDir) server(t *testing.T, host string) *tls.Config {
	t.Helper()
	c, k := p.files(host)
	cfg, err := pki.ServerTLS(p.caFile(), c, k)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// tlsFor returns client configurations presenting from's certificate.
func (p *pkiDir) tlsFor(from string) func(string) (*tls.Config, error) {
	return func(host string) (*tls.Config, error) {
		c, k := p.files(from)
		return pki.ClientTLS(p.caFile(), c, k, host)
	}
}

// serve starts a wire server for node on 127.0.0.1 and returns its address.
func serve(t *testing.T, node migrate.Peer, cfg *tls.Config, opts ...ServerOption) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	s := NewServer(node, cfg, nil, append([]ServerOption{WithShutdownGrace(time.Second)}, opts...)...)
	go func() { done <- s.Serve(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return lis.Addr().String()
}

func fixedAddr(addr string) func(string) (string, error) {
	return func(string) (string, error) { return addr, nil }
}

func client(t *testing.T, p *pkiDir, from, addr string, opts ...ClientOption) *Client {
	t.Helper()
	c := NewClient(p.tlsFor(from), fixedAddr(addr), opts...)
	t.Cleanup(func() { c.Close() })
	return c
}

const tx = "0123456789abcdef0123456789abcdef"

func statusCall(t *testing.T, c *Client, host, from string) (*migrate.StatusResponse, error) {
	t.Helper()
	p, err := c.Dial(context.Background(), host)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return p.Status(ctx, &migrate.StatusRequest{TxID: tx, VMs: []string{"vm"}, From: from})
}

func TestRoundTrip(t *testing.T) {
	p := newPKI(t, "ca", "host-a", "host-b")
	addr := serve(t, &fakePeer{}, p.server(t, "host-b"))
	c := client(t, p, "host-a", addr)
	resp, err := statusCall(t, c, "host-b", "host-a")
	if err != nil {
		t.Fatal(err)
	}
	if !resp.Known || resp.TxID != tx || len(resp.Running) != 1 {
		t.Fatalf("response %+v", resp)
	}
	peer, _ := c.Dial(context.Background(), "host-b")
	ev, err := peer.Evidence(context.Background(), &migrate.EvidenceRequest{Version: 1, Nonce: make([]byte, 32), Source: "host-a"})
	if err != nil || string(ev.Evidence) != `{"host":"x"}` {
		t.Fatalf("evidence: %s, %v", ev.Evidence, err)
	}
	fin, err := peer.Finish(context.Background(), &migrate.FinishRequest{Version: 1, TxID: tx, Source: "host-a",
		Commit: []string{"01234567-89ab-4def-8123-456789abcdef"}})
	if err != nil || fin.State != "committed" || len(fin.Committed) != 1 {
		t.Fatalf("finish: %+v, %v", fin, err)
	}
	// One connection per host, reused.
	if len(c.conns) != 1 {
		t.Fatalf("%d connections", len(c.conns))
	}
}

func TestErrorMapping(t *testing.T) {
	p := newPKI(t, "ca", "host-a", "host-b")
	fp := &fakePeer{}
	addr := serve(t, fp, p.server(t, "host-b"))
	c := client(t, p, "host-a", addr)
	for _, tc := range []struct {
		sentinel error
		reason   string
		code     codes.Code
	}{
		{migrate.ErrBusy, ReasonBusy, codes.Aborted},
		{migrate.ErrReplay, ReasonReplay, codes.AlreadyExists},
		{migrate.ErrUnknownTx, ReasonUnknownTx, codes.NotFound},
		{migrate.ErrBadMessage, ReasonBadMessage, codes.InvalidArgument},
		{migrate.ErrRefused, ReasonRefused, codes.FailedPrecondition},
		{migrate.ErrNotOwner, ReasonNotOwner, codes.FailedPrecondition},
		{migrate.ErrHypervisor, ReasonHypervisor, codes.Internal},
		{migrate.ErrUnresolved, ReasonUnresolved, codes.Aborted},
		{migrate.ErrPeer, ReasonPeer, codes.Unavailable},
		{migrate.ErrCrash, ReasonCrash, codes.Internal},
		{vtpm.ErrStaleGeneration, ReasonStaleGeneration, codes.FailedPrecondition},
		{vtpm.ErrWrongKey, ReasonWrongKey, codes.InvalidArgument},
		{vtpm.ErrKeyExists, ReasonKeyExists, codes.AlreadyExists},
		{vtpm.ErrKeyNotFound, ReasonKeyNotFound, codes.NotFound},
	} {
		t.Run(tc.reason, func(t *testing.T) {
			orig := fmt.Errorf("status %s: %w: detail 42", tx, tc.sentinel)
			fp.setStatus(func(context.Context, *migrate.StatusRequest) (*migrate.StatusResponse, error) { return nil, orig })
			_, err := statusCall(t, c, "host-b", "host-a")
			if !errors.Is(err, tc.sentinel) {
				t.Fatalf("%v: not %v", err, tc.sentinel)
			}
			if got := status.Code(err); got != tc.code {
				t.Fatalf("code %v, want %v", got, tc.code)
			}
			if !strings.Contains(err.Error(), orig.Error()) || !strings.Contains(err.Error(), "host-b") {
				t.Fatalf("message %q does not keep %q", err, orig)
			}
			var re *RemoteError
			if !errors.As(err, &re) || re.Reasons[0] != tc.reason {
				t.Fatalf("reasons %+v", re)
			}
			if tc.sentinel != migrate.ErrPeer && errors.Is(err, migrate.ErrPeer) {
				t.Fatalf("%v also matches ErrPeer", err)
			}
		})
	}
	t.Run("two sentinels", func(t *testing.T) {
		fp.setStatus(func(context.Context, *migrate.StatusRequest) (*migrate.StatusResponse, error) {
			return nil, fmt.Errorf("prepare: %w: VM x: %w", migrate.ErrBadMessage, vtpm.ErrWrongKey)
		})
		_, err := statusCall(t, c, "host-b", "host-a")
		if !errors.Is(err, migrate.ErrBadMessage) || !errors.Is(err, vtpm.ErrWrongKey) || status.Code(err) != codes.InvalidArgument {
			t.Fatalf("%v (%v)", err, status.Code(err))
		}
	})
	t.Run("no sentinel", func(t *testing.T) {
		fp.setStatus(func(context.Context, *migrate.StatusRequest) (*migrate.StatusResponse, error) {
			return nil, errors.New("TPM said no")
		})
		_, err := statusCall(t, c, "host-b", "host-a")
		if !errors.Is(err, migrate.ErrPeer) || status.Code(err) != codes.Unknown || !strings.Contains(err.Error(), "TPM said no") {
			t.Fatalf("%v (%v)", err, status.Code(err))
		}
	})
	t.Run("deadline", func(t *testing.T) {
		fp.setStatus(func(ctx context.Context, _ *migrate.StatusRequest) (*migrate.StatusResponse, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		})
		peer, _ := c.Dial(context.Background(), "host-b")
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := peer.Status(ctx, &migrate.StatusRequest{TxID: tx, From: "host-a"})
		if !errors.Is(err, migrate.ErrPeer) || !errors.Is(err, context.DeadlineExceeded) || status.Code(err) != codes.DeadlineExceeded {
			t.Fatalf("%v (%v)", err, status.Code(err))
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("deadline not respected: %v", d)
		}
	})
	t.Run("default call timeout", func(t *testing.T) {
		c2 := client(t, p, "host-a", addr, WithCallTimeout(200*time.Millisecond))
		peer, _ := c2.Dial(context.Background(), "host-b")
		_, err := peer.Status(context.Background(), &migrate.StatusRequest{TxID: tx, From: "host-a"})
		if !errors.Is(err, migrate.ErrPeer) || status.Code(err) != codes.DeadlineExceeded {
			t.Fatalf("%v (%v)", err, status.Code(err))
		}
	})
	fp.setStatus(nil)
}

func TestStrictDecoding(t *testing.T) {
	p := newPKI(t, "ca", "host-a", "host-b")
	fp := &fakePeer{}
	addr := serve(t, fp, p.server(t, "host-b"))
	c := client(t, p, "host-a", addr)
	if _, err := c.Dial(context.Background(), "host-b"); err != nil {
		t.Fatal(err)
	}
	cc := c.conns["host-b"].cc
	for _, tc := range []struct{ method, body string }{
		{MethodStatus, `{"tx":"` + tx + `","from":"host-a","evil":1}`},
		{MethodStatus, `{"tx":"` + tx + `","from":"host-a"} {}`},
		{MethodEvidence, `[]`},
		{MethodPrepare, `{"version":1,"tx":"` + tx + `","source":"host-a","dest":"host-b"}`},
		{MethodFinish, `{"version":2,"tx":"` + tx + `","source":"host-a"}`},
		{MethodFinish, `not json`},
	} {
		var out rawMessage
		msg := rawMessage(tc.body)
		err := cc.Invoke(context.Background(), FullMethod(tc.method), &msg, &out)
		err = fromStatus(context.Background(), "host-b", tc.method, err)
		if !errors.Is(err, migrate.ErrBadMessage) || status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s %s: %v", tc.method, tc.body, err)
		}
	}
	if fp.calls != 0 {
		t.Fatalf("the node saw %d malformed requests", fp.calls)
	}
	// Too large for the wire.
	peer, _ := c.Dial(context.Background(), "host-b")
	_, err := peer.Status(context.Background(), &migrate.StatusRequest{TxID: tx, From: "host-a", VMs: []string{strings.Repeat("x", MaxMessageSize)}})
	if !errors.Is(err, migrate.ErrPeer) || status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("oversized: %v (%v)", err, status.Code(err))
	}
}

func TestAuthorization(t *testing.T) {
	p := newPKI(t, "ca", "host-a", "host-b", "host-x")
	fp := &fakePeer{}
	var seen []string
	var mu sync.Mutex
	rec := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		mu.Lock()
		seen = append(seen, info.FullMethod)
		mu.Unlock()
		return h(ctx, req)
	}
	addr := serve(t, fp, p.server(t, "host-b"), WithUnaryInterceptor(rec))

	t.Run("claimed sender differs", func(t *testing.T) {
		c := client(t, p, "host-x", addr)
		_, err := statusCall(t, c, "host-b", "host-a")
		if status.Code(err) != codes.PermissionDenied || !errors.Is(err, ErrUnauthorized) || errors.Is(err, migrate.ErrPeer) {
			t.Fatalf("%v (%v)", err, status.Code(err))
		}
		if !strings.Contains(err.Error(), `"host-x"`) || !strings.Contains(err.Error(), `"host-a"`) {
			t.Fatalf("refusal does not name both hosts: %v", err)
		}
		if fp.calls != 0 {
			t.Fatal("the node was called")
		}
		peer, _ := c.Dial(context.Background(), "host-b")
		_, err = peer.Finish(context.Background(), &migrate.FinishRequest{Version: 1, TxID: tx, Source: "host-a"})
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("finish: %v", err)
		}
	})
	t.Run("other CA", func(t *testing.T) {
		other := newPKI(t, "evil ca", "host-a")
		// Trusts only the other CA: refuses the server.
		c := client(t, other, "host-a", addr)
		_, err := statusCall(t, c, "host-b", "host-a")
		if !errors.Is(err, migrate.ErrPeer) || status.Code(err) != codes.Unavailable {
			t.Fatalf("%v (%v)", err, status.Code(err))
		}
		t.Logf("other CA, client side: %v", err)
		// Trusts the server but presents a certificate of the other CA:
		// the server refuses it in the handshake.
		c = NewClient(func(host string) (*tls.Config, error) {
			cfg, err := other.tlsFor("host-a")(host)
			if err != nil {
				return nil, err
			}
			good, err := p.tlsFor("host-a")(host)
			if err != nil {
				return nil, err
			}
			cfg.RootCAs = good.RootCAs
			foreign := cfg.Certificates[0]
			cfg.Certificates = nil // send it even though the server asks for its own CA
			cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &foreign, nil }
			return cfg, nil
		}, fixedAddr(addr))
		defer c.Close()
		_, err = statusCall(t, c, "host-b", "host-a")
		if !errors.Is(err, migrate.ErrPeer) || status.Code(err) != codes.Unavailable {
			t.Fatalf("%v (%v)", err, status.Code(err))
		}
		t.Logf("other CA, server side: %v", err)
	})
	t.Run("server is another host", func(t *testing.T) {
		// Every certificate has 127.0.0.1: with an IP server name the
		// chain verifies, and only the host check catches the mix-up.
		c := NewClient(func(host string) (*tls.Config, error) {
			cf, k := p.files("host-a")
			return pki.ClientTLS(p.caFile(), cf, k, "127.0.0.1")
		}, fixedAddr(addr))
		defer c.Close()
		_, err := statusCall(t, c, "host-x", "host-a")
		if !errors.Is(err, migrate.ErrPeer) || !strings.Contains(err.Error(), "host-b") {
			t.Fatalf("%v", err)
		}
		t.Logf("wrong server: %v", err)
	})
	t.Run("authorized", func(t *testing.T) {
		c := client(t, p, "host-a", addr)
		if _, err := statusCall(t, c, "host-b", "host-a"); err != nil {
			t.Fatal(err)
		}
	})
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 3 { // denied status, denied finish, authorized status
		t.Fatalf("interceptor saw %v", seen)
	}
}

func TestServeConfigAndShutdown(t *testing.T) {
	p := newPKI(t, "ca", "host-a", "host-b")
	cfg := p.server(t, "host-b")
	cfg.ClientAuth = tls.VerifyClientCertIfGiven
	lis, _ := net.Listen("tcp", "127.0.0.1:0")
	if err := NewServer(&fakePeer{}, cfg, nil).Serve(context.Background(), lis); err == nil {
		t.Fatal("served without required client certificates")
	}
	lis, _ = net.Listen("tcp", "127.0.0.1:0")
	if err := NewServer(&fakePeer{}, nil, nil).Serve(context.Background(), lis); err == nil {
		t.Fatal("served without TLS")
	}

	// A call in flight outlives the grace: Serve still returns.
	fp := &fakePeer{}
	release := make(chan struct{})
	defer close(release)
	entered := make(chan struct{}, 1)
	fp.setStatus(func(ctx context.Context, _ *migrate.StatusRequest) (*migrate.StatusResponse, error) {
		entered <- struct{}{}
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil, ctx.Err()
	})
	lis, _ = net.Listen("tcp", "127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	s := NewServer(fp, p.server(t, "host-b"), nil, WithShutdownGrace(200*time.Millisecond))
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, lis) }()
	c := client(t, p, "host-a", lis.Addr().String())
	callErr := make(chan error, 1)
	go func() { _, err := statusCall(t, c, "host-b", "host-a"); callErr <- err }()
	<-entered
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after the grace")
	}
	if err := <-callErr; !errors.Is(err, migrate.ErrPeer) {
		t.Fatalf("call cut by shutdown: %v", err)
	}
	// Closed client.
	c.Close()
	if _, err := c.Dial(context.Background(), "host-b"); !errors.Is(err, ErrClosed) || !errors.Is(err, migrate.ErrPeer) {
		t.Fatalf("dial after close: %v", err)
	}
}

// TestReconnectAfterPeerRestart: a call to a peer that is down fails at
// once with ErrPeer; when the peer is back on the same address the next
// call succeeds at once (no reconnect backoff to wait out), and a stalled
// call's connection is replaced too.
func TestReconnectAfterPeerRestart(t *testing.T) {
	p := newPKI(t, "ca", "host-a", "host-b")
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	c := client(t, p, "host-a", addr)
	for i := 0; i < 3; i++ {
		start := time.Now()
		_, err := statusCall(t, c, "host-b", "host-a")
		if !errors.Is(err, migrate.ErrPeer) || status.Code(err) != codes.Unavailable {
			t.Fatalf("peer down: %v", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("failing took %v", d)
		}
	}
	if n := len(c.conns); n != 0 {
		t.Fatalf("%d broken connections cached", n)
	}
	lis, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("port taken meanwhile: %v", err)
	}
	fp := &fakePeer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- NewServer(fp, p.server(t, "host-b"), nil).Serve(ctx, lis) }()
	defer func() { cancel(); <-done }()
	start := time.Now()
	if _, err := statusCall(t, c, "host-b", "host-a"); err != nil {
		t.Fatalf("peer back: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("reconnect took %v", d)
	}
	// A call that times out evicts its connection; the calls after it
	// use a new one.
	fp.setStatus(func(ctx context.Context, _ *migrate.StatusRequest) (*migrate.StatusResponse, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	})
	old := c.conns["host-b"]
	peer, _ := c.Dial(context.Background(), "host-b")
	sctx, scancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, err = peer.Status(sctx, &migrate.StatusRequest{TxID: tx, From: "host-a"})
	scancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("stalled call: %v", err)
	}
	fp.setStatus(nil)
	if _, err := peer.Status(context.Background(), &migrate.StatusRequest{TxID: tx, From: "host-a"}); err != nil {
		t.Fatal(err)
	}
	if c.conns["host-b"] == old {
		t.Fatal("the connection of the timed-out call is still used")
	}
}
