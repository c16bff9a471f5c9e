package wire

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"

	"github.com/vtpmm/vtpmm/internal/pki"
	"github.com/vtpmm/vtpmm/migrate"
)

// DefaultCallTimeout bounds a call whose context has no deadline.
const DefaultCallTimeout = 2 * time.Minute

// ErrClosed means the Client was closed.
var ErrClosed = errors.New("wire: client closed")

// Client dials peer agents: one cached *grpc.ClientConn per host, mutual
// TLS, the JSON codec and keepalive. A call that fails in transport (no
// answer from the peer's agent: Unavailable, DeadlineExceeded) evicts its
// connection, which is closed once its last call returns, so the next call
// makes a fresh connection at once instead of waiting out a reconnect
// backoff or riding a connection that silently stalled.
type Client struct {
	tlsFor      func(host string) (*tls.Config, error)
	addrOf      func(host string) (string, error)
	callTimeout time.Duration

	mu     sync.Mutex
	conns  map[string]*clientConn
	closed bool
}

// clientConn is a cached connection and its calls in flight.
type clientConn struct {
	host    string
	cc      *grpc.ClientConn
	calls   int
	evicted bool
}

// ClientOption configures a Client.
type ClientOption func(*Client)

// WithCallTimeout sets the deadline of calls whose context has none
// (default DefaultCallTimeout; a context's own deadline always applies).
func WithCallTimeout(d time.Duration) ClientOption {
	return func(c *Client) { c.callTimeout = d }
}

// NewClient returns a Client. tlsFor gives the client TLS configuration
// for a peer (pki.ClientTLS with the peer's host name as server name);
// addrOf gives its "host:port" address. Both are called whenever a
// connection to the host is made.
func NewClient(tlsFor func(host string) (*tls.Config, error), addrOf func(host string) (string, error), opts ...ClientOption) *Client {
	c := &Client{tlsFor: tlsFor, addrOf: addrOf, callTimeout: DefaultCallTimeout, conns: map[string]*clientConn{}}
	for _, o := range opts {
		o(c)
	}
	return c
}

// Dial returns the Peer for host; it is a migrate.Dialer. It sets up the
// host's connection (TLS configuration and address) if there is none; the
// TCP and TLS handshakes happen with the first call.
func (c *Client) Dial(ctx context.Context, host string) (migrate.Peer, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := c.connLocked(host); err != nil {
		return nil, err
	}
	return &remotePeer{c: c, host: host}, nil
}

// connLocked returns host's cached connection, making it if needed.
func (c *Client) connLocked(host string) (*clientConn, error) {
	if c.closed {
		return nil, fmt.Errorf("wire: dial %s: %w: %w", host, migrate.ErrPeer, ErrClosed)
	}
	if cn, ok := c.conns[host]; ok {
		return cn, nil
	}
	if host == "" {
		return nil, fmt.Errorf("wire: dial: %w: empty host name", migrate.ErrPeer)
	}
	cfg, err := c.tlsFor(host)
	if err != nil {
		return nil, fmt.Errorf("wire: dial %s: TLS configuration: %w: %w", host, migrate.ErrPeer, err)
	}
	if cfg == nil || len(cfg.Certificates) == 0 && cfg.GetClientCertificate == nil {
		return nil, fmt.Errorf("wire: dial %s: %w: the TLS configuration has no client certificate", host, migrate.ErrPeer)
	}
	addr, err := c.addrOf(host)
	if err != nil {
		return nil, fmt.Errorf("wire: dial %s: address: %w: %w", host, migrate.ErrPeer, err)
	}
	cc, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(&hostCreds{TransportCredentials: credentials.NewTLS(cfg), host: host}),
		grpc.WithDefaultCallOptions(
			grpc.ForceCodec(jsonCodec{}),
			grpc.MaxCallRecvMsgSize(MaxMessageSize),
			grpc.MaxCallSendMsgSize(MaxMessageSize),
		),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 200 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
			MinConnectTimeout: 10 * time.Second,
		}),
		grpc.WithUserAgent("vtpmd-wire"),
	)
	if err != nil {
		return nil, fmt.Errorf("wire: dial %s at %s: %w: %w", host, addr, migrate.ErrPeer, err)
	}
	cn := &clientConn{host: host, cc: cc}
	c.conns[host] = cn
	return cn, nil
}

func (c *Client) acquire(host string) (*clientConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cn, err := c.connLocked(host)
	if err != nil {
		return nil, err
	}
	cn.calls++
	return cn, nil
}

// release ends a call on cn; broken evicts cn from the cache. An evicted
// connection is closed when its last call has returned.
func (c *Client) release(cn *clientConn, broken bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cn.calls--
	if broken && c.conns[cn.host] == cn {
		delete(c.conns, cn.host)
		cn.evicted = true
	}
	if cn.evicted && cn.calls == 0 {
		_ = cn.cc.Close()
	}
}

// Close closes every connection; calls in flight fail with ErrPeer.
// Dial fails afterwards.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	var errs []error
	for h, cn := range c.conns {
		if err := cn.cc.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", h, err))
		}
		delete(c.conns, h)
	}
	return errors.Join(errs...)
}

// remotePeer is a migrate.Peer over the Client's connection to host.
type remotePeer struct {
	c    *Client
	host string
}

var _ migrate.Peer = (*remotePeer)(nil)

func (p *remotePeer) invoke(ctx context.Context, method string, req, resp any) error {
	if _, ok := ctx.Deadline(); !ok && p.c.callTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, p.c.callTimeout)
		defer cancel()
	}
	cn, err := p.c.acquire(p.host)
	if err != nil {
		return err
	}
	err = cn.cc.Invoke(ctx, FullMethod(method), req, resp)
	if err == nil {
		p.c.release(cn, false)
		return nil
	}
	rerr := fromStatus(ctx, p.host, method, err)
	var re *RemoteError
	broken := errors.As(rerr, &re) && len(re.Reasons) == 0 &&
		(re.Code == codes.Unavailable || re.Code == codes.DeadlineExceeded)
	p.c.release(cn, broken)
	return rerr
}

// roundTrip calls one method and decodes its response.
func roundTrip[Resp any](ctx context.Context, p *remotePeer, method string, req any) (*Resp, error) {
	resp := new(Resp)
	if err := p.invoke(ctx, method, req, resp); err != nil {
		return nil, err
	}
	return resp, nil
}

func (p *remotePeer) Evidence(ctx context.Context, req *migrate.EvidenceRequest) (*migrate.EvidenceResponse, error) {
	return roundTrip[migrate.EvidenceResponse](ctx, p, MethodEvidence, req)
}

func (p *remotePeer) Prepare(ctx context.Context, req *migrate.PrepareRequest) (*migrate.PrepareResponse, error) {
	return roundTrip[migrate.PrepareResponse](ctx, p, MethodPrepare, req)
}

func (p *remotePeer) Finish(ctx context.Context, req *migrate.FinishRequest) (*migrate.FinishResponse, error) {
	return roundTrip[migrate.FinishResponse](ctx, p, MethodFinish, req)
}

func (p *remotePeer) Status(ctx context.Context, req *migrate.StatusRequest) (*migrate.StatusResponse, error) {
	return roundTrip[migrate.StatusResponse](ctx, p, MethodStatus, req)
}

func (p *remotePeer) Identity(ctx context.Context, req *migrate.IdentityRequest) (*migrate.IdentityResponse, error) {
	return roundTrip[migrate.IdentityResponse](ctx, p, MethodIdentity, req)
}

func (p *remotePeer) Activate(ctx context.Context, req *migrate.ActivateRequest) (*migrate.ActivateResponse, error) {
	return roundTrip[migrate.ActivateResponse](ctx, p, MethodActivate, req)
}

func (p *remotePeer) Pull(ctx context.Context, req *migrate.PullRequest) (*migrate.PullResponse, error) {
	return roundTrip[migrate.PullResponse](ctx, p, MethodPull, req)
}

// Restore relays a restore from escrow (migrate.Restorer).
func (p *remotePeer) Restore(ctx context.Context, req *migrate.RestoreRequest) (*migrate.PrepareResponse, error) {
	return roundTrip[migrate.PrepareResponse](ctx, p, MethodRestore, req)
}

var _ migrate.Restorer = (*remotePeer)(nil)

// Replicate sends a standby replica refresh (migrate.Replicator).
func (p *remotePeer) Replicate(ctx context.Context, req *migrate.ReplicaRequest) (*migrate.ReplicaResponse, error) {
	return roundTrip[migrate.ReplicaResponse](ctx, p, MethodReplicate, req)
}

var _ migrate.Replicator = (*remotePeer)(nil)

// hostCreds wraps the TLS credentials of one peer: after the handshake
// (which already verified the chain and the server name), the server's
// verified certificate must name the host dialled, so an address that
// reaches another agent (a stale DNS entry, an IP server name shared by
// all certificates) is refused.
type hostCreds struct {
	credentials.TransportCredentials
	host string
}

func (h *hostCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, ai, err := h.TransportCredentials.ClientHandshake(ctx, authority, raw)
	if err != nil {
		return nil, nil, err
	}
	ti, ok := ai.(credentials.TLSInfo)
	if !ok {
		conn.Close()
		return nil, nil, fmt.Errorf("wire: %s: not a TLS connection", h.host)
	}
	got, err := pki.PeerHost(ti.State)
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("wire: %s: %w", h.host, err)
	}
	if got != h.host {
		conn.Close()
		return nil, nil, fmt.Errorf("wire: dialled %s at %s but the server's certificate is for %s", h.host, authority, got)
	}
	return conn, ai, nil
}

func (h *hostCreds) Clone() credentials.TransportCredentials {
	return &hostCreds{TransportCredentials: h.TransportCredentials.Clone(), host: h.host}
}
