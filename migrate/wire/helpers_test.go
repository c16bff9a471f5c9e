package wire

import (
	"context"
	"crypto/tls"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/pki"
	"github.com/vtpmm/vtpmm/migrate"
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
