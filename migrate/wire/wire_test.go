package wire

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vtpmm/vtpmm/internal/pki"
	"github.com/vtpmm/vtpmm/migrate"
)

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
