package registry

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Client is the Registry on etcd (ModeEmbedded and ModeEtcd). Its
// lifecycle: OpenClient starts the member (embedded) and the client
// without needing quorum; Ready closes once the member serves (at once in
// ModeEtcd); Err reports the member's asynchronous failures; Close stops
// everything, in order, once.
type Client struct {
	cfg    Config
	log    logrus.FieldLogger
	k      keys
	cli    *clientv3.Client
	kv     *CountingKV
	member EmbeddedMember // nil in ModeEtcd
	tls    *tls.Config
	cache  *cache

	bg     context.Context // background work (liveness); cancelled by Close
	stop   context.CancelFunc
	wg     sync.WaitGroup
	closed atomic.Bool
	once   sync.Once

	liveMu    sync.Mutex
	liveHost  *Host // set by Register; the keeper re-registers it
	lease     clientv3.LeaseID
	keeping   bool
	liveUntil atomic.Int64 // unix nanos until which the lease is known alive
	abandon   atomic.Bool  // Close leaves the lease to expire (Abandon)
	// enrolChanges counts the enrolment changes the watch
	// delivered (and every (re)start of the watch): EnrolmentChanges.
	enrolChanges atomic.Uint64
}

var _ Registry = (*Client)(nil)

// EmbeddedMember is an etcd member running in this process. Package
// migrate/registry/member starts one (member.Start); the daemon wires it
// into Config.StartMember, so that tools that only talk to the registry do
// not link etcd's server.
type EmbeddedMember interface {
	// Ready closes once the member has joined its cluster and serves.
	Ready() <-chan struct{}
	// Err reports asynchronous failures.
	Err() <-chan error
	// Close stops the member (gracefully, bounded by etcd's request timeout).
	Close()
	// Crash stops the member as a crash or power loss would: no leadership
	// transfer, no goodbye to its peers (the client was Abandoned).
	Crash()
}

// Open returns the Registry that cfg selects: nil (and no error) for
// ModeNone or an empty Mode, the one representation of a disabled
// registry; a *Client otherwise.
func Open(ctx context.Context, cfg Config) (Registry, error) {
	if cfg.Mode == ModeNone || cfg.Mode == "" {
		return nil, nil
	}
	c, err := OpenClient(ctx, cfg)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// OpenClient is Open for the two real modes, returning the concrete type
// (operator tools: Bootstrap, member management, round-trip counts). It
// refuses ModeNone. It never waits for quorum: a host must start, and start
// the VMs it owns by its last view, while the registry is down.
func OpenClient(ctx context.Context, in Config) (_ *Client, err error) {
	cfg, err := in.withDefaults()
	if err != nil {
		return nil, err
	}
	c := &Client{cfg: cfg, k: keys{prefix: cfg.Prefix}}
	c.log = cfg.Log.WithFields(logrus.Fields{"component": "registry", "mode": string(cfg.Mode)})
	c.bg, c.stop = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	if c.cache, err = openCache(cfg.CacheFile, c.log); err != nil {
		return nil, err
	}
	endpoints := cfg.Endpoints
	if cfg.Mode == ModeEmbedded {
		if cfg.StartMember == nil {
			return nil, fmt.Errorf("%w: mode embedded needs Config.StartMember (member.Start, wired by the daemon)", ErrConfig)
		}
		if c.member, err = cfg.StartMember(cfg); err != nil {
			return nil, err
		}
		endpoints = []string{cfg.Embedded.Self().ClientURL}
	}
	if c.tls, err = cfg.clientTLS(); err != nil {
		return nil, err
	}
	c.cli, err = clientv3.New(clientv3.Config{
		Endpoints:          endpoints,
		TLS:                c.tls,
		DialTimeout:        cfg.OpTimeout,
		DialKeepAliveTime:  10 * time.Second,
		MaxCallSendMsgSize: 2 << 20,
		Logger:             ZapLogger(c.log, "warn"),
	})
	if err != nil {
		return nil, fmt.Errorf("registry: client: %w", err)
	}
	c.kv = NewCountingKV(c.cli.KV)
	if !cfg.NoFollow {
		c.wg.Add(2)
		go c.followVMs()
		go c.followEnrolments()
	}
	return c, nil
}

// Ready closes when the embedded member has joined its cluster and serves
// (immediately in ModeEtcd). Operations work before that only if quorum
// exists elsewhere; they fail closed otherwise.
func (c *Client) Ready() <-chan struct{} {
	if c.member == nil {
		ch := make(chan struct{})
		close(ch)
		return ch
	}
	return c.member.Ready()
}

// Err reports asynchronous failures of the embedded member (nil channel in
// ModeEtcd).
func (c *Client) Err() <-chan error {
	if c.member == nil {
		return nil
	}
	return c.member.Err()
}

// RoundTrips returns the etcd KV round trips this client made so far
// (liveness keep-alives and watches are not KV requests and not counted).
func (c *Client) RoundTrips() int64 { return c.kv.Count() }

// Etcd returns the underlying etcd client, for operator tools (member
// management) and tests. Its KV calls are not counted.
func (c *Client) Etcd() *clientv3.Client { return c.cli }

// Close implements Registry. Order: stop the keep-alive, revoke the lease
// (bounded by OpTimeout), close the client, stop the member, write the
// cache file.
func (c *Client) Close() error {
	var errs []error
	c.once.Do(func() {
		c.closed.Store(true)
		c.liveUntil.Store(1) // closed: not live any more (Live false, LeaseLost true)
		c.stop()
		c.wg.Wait()
		c.liveMu.Lock()
		lease := c.lease
		c.lease = 0
		c.liveMu.Unlock()
		if lease != 0 && c.cli != nil && !c.abandon.Load() {
			ctx, cancel := context.WithTimeout(context.Background(), c.cfg.OpTimeout)
			if _, err := c.cli.Revoke(ctx, lease); err != nil {
				c.log.WithError(err).Warn("revoking the liveness lease failed; it expires by itself")
			}
			cancel()
		}
		if c.cli != nil {
			if err := c.cli.Close(); err != nil && !errors.Is(err, context.Canceled) {
				errs = append(errs, fmt.Errorf("registry: close client: %w", err))
			}
		}
		switch {
		case c.member != nil && c.abandon.Load():
			c.member.Crash()
		case c.member != nil:
			c.member.Close()
		}
		if c.cache != nil {
			if err := c.cache.close(); err != nil {
				errs = append(errs, err)
			}
		}
	})
	return errors.Join(errs...)
}

// Snapshot implements Registry.
func (c *Client) Snapshot(ctx context.Context, w io.Writer) error {
	if c.closed.Load() {
		return fmt.Errorf("registry snapshot: %w", ErrClosed)
	}
	rc, err := c.cli.Snapshot(ctx)
	if err != nil {
		return fmt.Errorf("registry snapshot: %w", c.classify(ctx, err))
	}
	defer rc.Close()
	if _, err := io.Copy(w, rc); err != nil {
		return fmt.Errorf("registry snapshot: %w", c.classify(ctx, err))
	}
	return nil
}

// do runs one registry operation bounded by OpTimeout, requiring a leader
// (a member cut off from its quorum answers at once instead of waiting),
// and maps etcd's errors to this package's sentinels.
func (c *Client) do(ctx context.Context, op string, f func(ctx context.Context) error) error {
	if c.closed.Load() {
		return fmt.Errorf("%s: %w", op, ErrClosed)
	}
	octx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), c.cfg.OpTimeout)
	defer cancel()
	if err := f(octx); err != nil {
		return fmt.Errorf("%s: %w", op, c.classify(ctx, err))
	}
	return nil
}

// read runs an idempotent read as do does, and repeats it while the
// cluster elects a leader: etcd answers "leader changed" or "no leader" at
// once then, and a read changes nothing, so repeating it is safe. (A write
// is not repeated here: its outcome may be unknown, and the caller's
// compare-and-swap decides.) OpTimeout bounds the whole.
func (c *Client) read(ctx context.Context, op string, f func(ctx context.Context) error) error {
	if c.closed.Load() {
		return fmt.Errorf("%s: %w", op, ErrClosed)
	}
	octx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), c.cfg.OpTimeout)
	defer cancel()
	delay := 10 * time.Millisecond
	for {
		err := f(octx)
		if err == nil {
			return nil
		}
		if !electing(err) {
			return fmt.Errorf("%s: %w", op, c.classify(ctx, err))
		}
		select {
		case <-octx.Done():
			return fmt.Errorf("%s: %w", op, c.classify(ctx, err))
		case <-time.After(delay):
		}
		delay = min(2*delay, 200*time.Millisecond)
	}
}

// electing reports an error etcd returns while its members elect a leader.
func electing(err error) bool {
	err = rpctypes.Error(err)
	return errors.Is(err, rpctypes.ErrLeaderChanged) || errors.Is(err, rpctypes.ErrNoLeader) ||
		errors.Is(err, rpctypes.ErrGRPCLeaderChanged) || errors.Is(err, rpctypes.ErrGRPCNoLeader)
}

// classify maps an etcd client error to a sentinel. ctx is the caller's:
// its own cancellation is reported as such, not as a lost quorum.
func (c *Client) classify(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%v)", ctx.Err(), err)
	}
	if c.closed.Load() {
		return fmt.Errorf("%w: %v", ErrClosed, err)
	}
	var ee rpctypes.EtcdError
	code := status.Code(err)
	if errors.As(err, &ee) {
		code = ee.Code()
		switch {
		case errors.Is(err, rpctypes.ErrTooManyOps), errors.Is(err, rpctypes.ErrRequestTooLarge):
			return fmt.Errorf("%w: %v (max_txn_ops %d)", ErrBatchTooLarge, err, c.cfg.MaxTxnOps)
		case errors.Is(err, rpctypes.ErrUserEmpty):
			return fmt.Errorf("%w: %v", ErrPermission, err)
		}
	}
	switch code {
	case codes.PermissionDenied, codes.Unauthenticated:
		return fmt.Errorf("%w: %v", ErrPermission, err)
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled:
		return c.unavailable(err)
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return c.unavailable(err)
	}
	return err
}

// unavailable tells a TLS refusal (a certificate of another CA, a server
// that is not the fleet's) from a lost quorum: gRPC reports both as
// "unavailable", so a short TLS probe of the first endpoint decides.
func (c *Client) unavailable(err error) error {
	if terr := c.probeTLS(); terr != nil {
		return fmt.Errorf("%w: %v (%v)", ErrTLS, terr, err)
	}
	return fmt.Errorf("%w: %v", ErrNoQuorum, err)
}

func (c *Client) probeTLS() error {
	eps := c.cli.Endpoints()
	if len(eps) == 0 {
		return nil
	}
	u, err := url.Parse(eps[0])
	if err != nil {
		return nil
	}
	cfg := c.tls.Clone()
	cfg.NextProtos = []string{"h2"}
	if cfg.ServerName == "" {
		cfg.ServerName = u.Hostname()
	}
	d := &net.Dialer{Timeout: 300 * time.Millisecond}
	conn, err := tls.DialWithDialer(d, "tcp", u.Host, cfg)
	if err != nil {
		return tlsError(err)
	}
	defer conn.Close()
	// TLS 1.3: the server checks our certificate after our Finished and
	// answers a refusal with an alert on the first read.
	_ = conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	_, err = conn.Read(make([]byte, 1))
	return tlsError(err)
}

// tlsError returns err if it is a certificate or TLS alert error.
func tlsError(err error) error {
	if err == nil {
		return nil
	}
	var (
		alert tls.AlertError
		verr  *tls.CertificateVerificationError
		uerr  x509.UnknownAuthorityError
		herr  x509.HostnameError
		cerr  x509.CertificateInvalidError
		rerr  tls.RecordHeaderError
	)
	if errors.As(err, &alert) || errors.As(err, &verr) || errors.As(err, &uerr) || errors.As(err, &herr) || errors.As(err, &cerr) || errors.As(err, &rerr) {
		return err
	}
	// An alert from the server (our certificate refused) comes as an
	// OpError whose operation crypto/tls names "remote error".
	var oerr *net.OpError
	if errors.As(err, &oerr) && oerr.Op == "remote error" {
		return err
	}
	return nil
}
