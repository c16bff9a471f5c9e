package migrate_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/pki"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/wire"
)

// wireNet puts fleet hosts on the agent wire: each host gets a
// certificate from one development CA, a wire server for its node on
// 127.0.0.1, and a cutProxy in front of that server; every host's node is
// rebuilt with a wire.Client as its Dialer, which reaches peers through
// their proxies. Each server records the decoded requests it received.
type wireNet struct {
	t       testing.TB
	f       *fleet
	pkiDir  string
	ca      *pki.CA
	proxies map[string]*cutProxy
	recs    map[string]*recorder
	clients map[string]*wire.Client
}

func newWireNet(f *fleet, hosts ...*host) *wireNet {
	t := f.t
	t.Helper()
	dir := tempDir(t, "wire-pki-")
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), pki.CAOptions{Name: "vtpmm test CA"})
	if err != nil {
		t.Fatal(err)
	}
	w := &wireNet{t: t, f: f, pkiDir: dir, ca: ca, proxies: map[string]*cutProxy{}, recs: map[string]*recorder{}, clients: map[string]*wire.Client{}}
	for _, h := range hosts {
		w.issue(h.name)
		w.proxies[h.name] = newCutProxy(t)
		w.recs[h.name] = &recorder{}
	}
	for _, h := range hosts {
		w.attach(h)
	}
	return w
}

func (w *wireNet) issue(name string) {
	w.t.Helper()
	if _, _, err := w.ca.IssueToDir(name, filepath.Join(w.pkiDir, "hosts"), pki.IssueOptions{}); err != nil {
		w.t.Fatal(err)
	}
}

func (w *wireNet) caFile() string { return filepath.Join(w.pkiDir, "ca", pki.CACertFile) }

func (w *wireNet) certFiles(name string) (string, string) {
	return filepath.Join(w.pkiDir, "hosts", name+".crt"), filepath.Join(w.pkiDir, "hosts", name+".key")
}

// client returns a wire client presenting from's certificate.
func (w *wireNet) client(from string) *wire.Client {
	c := wire.NewClient(func(host string) (*tls.Config, error) {
		cert, key := w.certFiles(from)
		return pki.ClientTLS(w.caFile(), cert, key, host)
	}, func(host string) (string, error) {
		p, ok := w.proxies[host]
		if !ok {
			return "", errors.New("no address for " + host)
		}
		return p.addr(), nil
	})
	w.t.Cleanup(func() { c.Close() })
	return c
}

// attach rebuilds h's node as restart does, but dialling over the wire,
// and serves it.
func (w *wireNet) attach(h *host) {
	t := w.t
	t.Helper()
	c := w.client(h.name)
	w.clients[h.name] = c
	h.node = migrate.NewNode(migrate.Config{
		Host: h.name, Keys: h.keys, TPM: h.meter, Identity: h.ident, Hypervisor: h.hyp, Ledger: h.ledger,
		Anchor:      harnessAnchor{h},
		Verifier:    &attest.Verifier{Roots: h.f.roots, Policy: h.f.policy, Enrollments: h.f.enr, Clock: time.Now},
		Enrollments: h.f.enr,
		QuotePCRs:   map[attest.Bank][]int{"sha256": quoted},
		EventLog:    readFile(t, bootLogOf(h)),
		Dial:        c.Dial,
		Target: func(name string) (hypervisor.Target, error) {
			if d, ok := h.f.hosts[name]; ok {
				return d.hyp.Target(), nil
			}
			return hypervisor.Target{}, errors.New("unknown host " + name)
		},
		Log:            h.logger(),
		EvidenceMaxAge: h.f.maxAge,
		Audit:          h.audit,
	})
	cert, key := w.certFiles(h.name)
	cfg, err := pki.ServerTLS(w.caFile(), cert, key)
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := wire.NewServer(h.node, cfg, h.logger(), wire.WithShutdownGrace(2*time.Second),
		wire.WithUnaryInterceptor(w.intercept(h.name)))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("%s: serve: %v", h.name, err)
		}
	})
	w.proxies[h.name].setTarget(lis.Addr().String())
}

// intercept records every decoded request and fires the proxy's armed cut
// before or after the node handles it.
func (w *wireNet) intercept(name string) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		method := info.FullMethod[len("/"+wire.ServiceName+"/"):]
		w.recs[name].record(method, req)
		px := w.proxies[name]
		if px.fire(method, cutBefore) {
			return nil, status.Error(codes.Unavailable, "cut before the handler")
		}
		resp, err := handler(ctx, req)
		px.fire(method, cutAfter)
		return resp, err
	}
}

// recorder keeps the decoded requests a server received.
type recorder struct {
	mu   sync.Mutex
	reqs []recorded
}

type recorded struct {
	method string
	req    any
}

func (r *recorder) record(method string, req any) {
	r.mu.Lock()
	r.reqs = append(r.reqs, recorded{method, req})
	r.mu.Unlock()
}

func (r *recorder) all() []recorded {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]recorded(nil), r.reqs...)
}

type cutMode int

const (
	forward cutMode = iota
	drop            // close every connection, refuse new ones
	stall           // keep connections open, forward nothing
)

func (m cutMode) String() string { return [...]string{"forward", "drop", "stall"}[m] }

type cutWhen int

const (
	cutBefore cutWhen = iota // the request never reaches the node
	cutAfter                 // the node handled it, the response is lost
)

func (w cutWhen) String() string { return [...]string{"before", "after"}[w] }

// cutProxy is a TCP proxy on 127.0.0.1 in front of one agent. It can drop
// or stall all traffic, on command or when armed for a request, and can
// capture every byte it forwards.
type cutProxy struct {
	lis net.Listener

	mu        sync.Mutex
	target    string
	mode      cutMode
	conns     map[net.Conn]struct{}
	arm       *armed
	fired     bool
	capturing bool
	captured  []byte
	wg        sync.WaitGroup
}

type armed struct {
	method string
	when   cutWhen
	mode   cutMode
}

func newCutProxy(t testing.TB) *cutProxy {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{lis: lis, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *cutProxy) addr() string { return p.lis.Addr().String() }

func (p *cutProxy) setTarget(addr string) {
	p.mu.Lock()
	p.target = addr
	p.mu.Unlock()
}

func (p *cutProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.lis.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		mode, target := p.mode, p.target
		p.mu.Unlock()
		if mode == drop {
			c.Close()
			continue
		}
		var up net.Conn
		if mode == forward {
			if up, err = net.DialTimeout("tcp", target, 2*time.Second); err != nil {
				c.Close()
				continue
			}
		}
		p.mu.Lock()
		if p.mode != mode { // cut or healed meanwhile: let the client retry
			p.mu.Unlock()
			c.Close()
			if up != nil {
				up.Close()
			}
			continue
		}
		p.conns[c] = struct{}{}
		if up != nil {
			p.conns[up] = struct{}{}
		}
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pump(c, up)
		go p.pump(up, c)
	}
}

// pump copies src to dst while forwarding; it discards while stalled. A
// nil end (a connection accepted while stalled) is never forwarded to.
func (p *cutProxy) pump(src, dst net.Conn) {
	defer p.wg.Done()
	if src == nil {
		return
	}
	defer func() {
		src.Close()
		if dst != nil {
			dst.Close()
		}
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			mode := p.mode
			if mode == forward && p.capturing {
				p.captured = append(p.captured, buf[:n]...)
			}
			p.mu.Unlock()
			if mode == forward && dst != nil {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					return
				}
			}
		}
		if err != nil {
			return
		}
	}
}

// cut switches to mode now.
func (p *cutProxy) cut(mode cutMode) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.mode = mode
	if mode == drop {
		p.closeConnsLocked()
	}
}

// heal forwards again; connections made during the cut are closed, so
// clients reconnect.
func (p *cutProxy) heal() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.mode = forward
	p.arm = nil
	p.closeConnsLocked()
}

func (p *cutProxy) closeConnsLocked() {
	for c := range p.conns {
		c.Close()
		delete(p.conns, c)
	}
}

// armCut makes the next request of method cut the network, before or after
// the node handles it.
func (p *cutProxy) armCut(method string, when cutWhen, mode cutMode) {
	p.mu.Lock()
	p.arm, p.fired = &armed{method, when, mode}, false
	p.mu.Unlock()
}

// fire cuts if armed for (method, when), once.
func (p *cutProxy) fire(method string, when cutWhen) bool {
	p.mu.Lock()
	a := p.arm
	if a == nil || a.method != method || a.when != when {
		p.mu.Unlock()
		return false
	}
	p.arm, p.fired = nil, true
	p.mu.Unlock()
	p.cut(a.mode)
	return true
}

func (p *cutProxy) didFire() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.fired
}

func (p *cutProxy) startCapture() {
	p.mu.Lock()
	p.capturing, p.captured = true, nil
	p.mu.Unlock()
}

func (p *cutProxy) capture() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]byte(nil), p.captured...)
}

func (p *cutProxy) close() {
	p.lis.Close()
	p.mu.Lock()
	p.closeConnsLocked()
	p.mu.Unlock()
	p.wg.Wait()
}
