package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/internal/metrics"
	"github.com/vtpmm/vtpmm/internal/pki"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/escrow"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/wire"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/host"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// Deps are a daemon's injected dependencies.
type Deps struct {
	// Host are the host's dependencies (logger, clock, TPM URI schemes,
	// randomness).
	Host host.Options
	// Hypervisors opens the configured hypervisor URI (cmd/vtpmd registers
	// hypervisor/libvirt). An empty URI is hypervisor.None.
	Hypervisors *hypervisor.Registry
	// Hypervisor, when set, is used instead of opening the configured URI
	// (the fake hypervisor of the in-process fleet); the daemon does not
	// close it.
	Hypervisor hypervisor.Hypervisor
	// Target maps a host to its hypervisor migration target (default: the
	// configured peer_hypervisors).
	Target func(host string) (hypervisor.Target, error)
	// Enrollments overrides attestation.enrollments.
	Enrollments attest.Enrollments
	// WireListener, AdminListener and MetricsListener, when set, are used
	// instead of binding listen, admin_socket and metrics_listen; Close
	// closes them.
	WireListener, AdminListener, MetricsListener net.Listener
	// Crash is the migrate crash hook (tests only).
	Crash migrate.CrashHook
	// FreeMemory reports a destination host's free memory for an
	// evacuation's placement, and VMMemory a VM's memory (nil: the
	// hypervisor's, when it implements hypervisor.Capacity, as libvirt and
	// the fake do; else unknown, and placement balances by count).
	FreeMemory func(ctx context.Context, host string) (uint64, error)
	VMMemory   func(ctx context.Context, vm string) (uint64, error)
	// EvacuationSettle bounds an evacuation's wait for open transactions
	// to be settled by recovery (0: evacuate.DefaultSettleTimeout).
	EvacuationSettle time.Duration
	// Fence, when set, is the fence agent instead of standby.fence.command
	// (the in-process fleet's fence kills a host's daemon and domains).
	Fence migrate.FenceFunc
}

// Daemon is a running vtpmd.
type Daemon struct {
	cfg  Config
	deps Deps
	log  logrus.FieldLogger

	host     *host.Host
	ident    *identity.Identity
	ledger   *migrate.Ledger
	audit    *audit.Log
	metrics  *metrics.Metrics
	hyp      hypervisor.Hypervisor
	closeHyp bool // the daemon opened hyp and closes it
	wire     *wire.Client
	enroll   attest.Enrollments // where enrolments are recorded (the verifier's store)
	node     *migrate.Node
	now      func() time.Time
	sealer   *escrow.Sealer // nil without escrow custodians

	reg     *registry.Client // nil in registry mode none
	fleet   *fleetView       // the registry's hosts, cached
	syncNow chan struct{}    // asks the registry loop for an ownership sync
	// registered is closed once the registry loop registered this host
	// (its liveness key written): starts wait for it (waitRegistered).
	registered chan struct{}
	addrs      sync.Map // host -> wire address an enrolment request named

	evac    evacStats    // evacuations run here (evacuate.go)
	standby standbyState // replicas refreshed (standby.go)

	wireLis, adminLis, metricsLis net.Listener
	services                      []service

	ready    chan struct{}
	errc     chan error
	stop     context.CancelFunc // stops the services
	served   sync.WaitGroup     // the services' goroutines
	bgCtx    context.Context    // background work started by requests (settling)
	bgCancel context.CancelFunc
	bg       sync.WaitGroup
	settling sync.Map // VM UUID -> struct{}: a settle is scheduled
	// rekeyMu serialises key rotations and hook-mode start preparations.
	rekeyMu sync.Mutex

	closeOnce sync.Once
	closeErr  error
}

// service is one thing the daemon serves until its context ends.
type service struct {
	name  string
	serve func(ctx context.Context) error
}

// Start opens everything a running vtpmd needs, in this order: the host
// (TPM, vault, key store), the TPM identity, the ledger, the audit log,
// the verifier, the hypervisor, the agent wire's client, the migration
// node; then it binds the agent wire (when TLS is configured), the admin
// socket and the metrics listener. It returns once all are bound; in the
// background the daemon then reconciles open transactions, starts serving
// and closes Ready. If Start fails, it closes what it opened.
func Start(ctx context.Context, cfg Config, deps Deps) (_ *Daemon, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	d := &Daemon{cfg: cfg, deps: deps, metrics: metrics.New(), hyp: deps.Hypervisor,
		ready: make(chan struct{}), errc: make(chan error, 8), syncNow: make(chan struct{}, 1), registered: make(chan struct{}),
		standby: standbyState{sent: map[replicaKey]replicaSent{}, refused: map[string]time.Time{}, now: make(chan struct{}, 1)}}
	d.bgCtx, d.bgCancel = context.WithCancel(context.WithoutCancel(ctx))
	defer func() {
		if err != nil {
			_ = d.Close(context.WithoutCancel(ctx))
		}
	}()
	hostOpts := deps.Host
	hostOpts.Rekeyed = d.auditRekey
	if d.host, err = host.Open(ctx, cfg.Config, hostOpts); err != nil {
		return nil, err
	}
	d.log = deps.Host.Log
	if d.log == nil {
		d.log = discard()
	}
	d.log = d.log.WithField("host", cfg.HostID)
	now := deps.Host.Now
	if now == nil {
		now = time.Now
	}
	d.now = now
	if d.ident, err = identity.LoadIdentity(ctx, d.host.Meter(), identity.LoadOptions{AKCert: identity.AKCertSource{File: cfg.Attestation.AKCert}}); err != nil {
		return nil, fmt.Errorf("start daemon: %w (run 'vtpmd init' or 'vtpmd evidence provision')", err)
	}
	if err := d.checkFiles(); err != nil {
		return nil, err
	}
	if err := d.openEscrow(); err != nil {
		return nil, err
	}
	if d.ledger, err = migrate.OpenLedger(cfg.Layout().Ledger(), now); err != nil {
		return nil, err
	}
	if d.audit, err = audit.Open(cfg.AuditLogPath(), audit.Options{Host: cfg.HostID, Now: now, Log: d.log}); err != nil {
		return nil, err
	}
	d.recordAuditMark(ctx)
	if err := d.openRegistry(ctx); err != nil {
		return nil, err
	}
	verifier, err := d.verifier(now)
	if err != nil {
		return nil, err
	}
	if verifier != nil {
		d.enroll = verifier.Enrollments
	} else if deps.Enrollments != nil {
		d.enroll = deps.Enrollments
	} else if d.reg != nil {
		d.enroll = regEnrollments{d.fleet} // every host trusts the registry's enrolments
	} else if cfg.Attestation.Enrollments != "" {
		// A host without a policy sends no vTPMs, but it answers enrolled
		// peers only, and so needs the store of enrolments.
		d.enroll = &attest.FileEnrollments{Path: cfg.Attestation.Enrollments}
	}
	if err := d.checkEnrollments(ctx); err != nil {
		return nil, err
	}
	if d.hyp == nil {
		if d.hyp, err = deps.Hypervisors.Open(ctx, hypervisor.Config{URI: cfg.Hypervisor, Name: cfg.HostID, Log: d.log}); err != nil {
			return nil, fmt.Errorf("start daemon: %w", err)
		}
		d.closeHyp = true
	}
	if cfg.TLS.CA != "" {
		t := cfg.TLS
		d.wire = wire.NewClient(
			func(h string) (*tls.Config, error) { return pki.ClientTLS(t.CA, t.Cert, t.Key, h) },
			func(h string) (string, error) { return d.peerAddr(context.Background(), h) })
	}
	maxAge, _ := cfg.evidenceMaxAge()
	d.node = migrate.NewNode(migrate.Config{
		Host: cfg.HostID, Keys: d.host.Keys(), TPM: d.host.Meter(), Identity: d.ident, Hypervisor: d.hyp, Ledger: d.ledger,
		Anchor: anchorAdapter{d.host, d.audit}, Registry: d.migrateRegistry(),
		Verifier: verifier, Enrollments: d.enroll, QuotePCRs: quotePCRs(verifier), EventLog: d.eventLog(),
		Dial: d.dial, Target: d.target(), EvidenceMaxAge: maxAge, Crash: deps.Crash, States: restoredStates{d},
		Replicas: &migrate.ReplicaStore{Dir: filepath.Join(cfg.DataDir, "replicas")}, Fence: d.fenceFunc(),
		Audit: auditAdapter{d.audit}, Metrics: d.metrics, Now: now, Log: d.log, Registered: d.registeredFunc(),
	})
	d.metrics.SetTPMCounter(func() map[string]int {
		out := map[string]int{}
		for cc, n := range d.host.Meter().Stats().ByCode {
			out[vtpm.CommandName(cc)] = n
		}
		return out
	})
	if err := d.listen(); err != nil {
		return nil, err
	}
	sctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	d.stop = stop
	d.served.Add(1)
	go d.run(sctx)
	return d, nil
}

func discard() logrus.FieldLogger {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return l
}

// verifier is the attestation verifier of this host, or nil when no
// policy is configured: the host can then receive vTPMs but not send them
// (Migrate says so).
func (d *Daemon) verifier(now func() time.Time) (*attest.Verifier, error) {
	a := d.cfg.Attestation
	if a.Policy == "" {
		return nil, nil
	}
	v := &attest.Verifier{Clock: now, Log: d.log, Enrollments: d.deps.Enrollments}
	var err error
	if v.Policy, err = attest.LoadPolicy(a.Policy); err != nil {
		return nil, fmt.Errorf("%w: attestation.policy: %w", ErrConfig, err)
	}
	if v.Roots, err = attest.LoadRootStore(a.Roots...); err != nil {
		return nil, fmt.Errorf("%w: attestation.roots: %w", ErrConfig, err)
	}
	if len(a.AKRoots) > 0 {
		if v.AKRoots, err = attest.LoadRootStore(a.AKRoots...); err != nil {
			return nil, fmt.Errorf("%w: attestation.ak_roots: %w", ErrConfig, err)
		}
	}
	if v.Enrollments == nil && d.reg != nil {
		v.Enrollments = regEnrollments{d.fleet} // every host trusts the registry's enrolments
	}
	if v.Enrollments == nil {
		if a.Enrollments == "" {
			return nil, fmt.Errorf("%w: attestation.enrollments is required", ErrConfig)
		}
		v.Enrollments = &attest.FileEnrollments{Path: a.Enrollments}
	}
	return v, nil
}

func quotePCRs(v *attest.Verifier) map[attest.Bank][]int {
	if v == nil {
		return nil
	}
	return identity.PCRsForPolicy(v.Policy)
}

// eventLog is this host's TCG event log, sent with its evidence; without
// one, evidence carries the quote only.
func (d *Daemon) eventLog() []byte {
	if d.cfg.EventLog == "" {
		return nil
	}
	b, err := os.ReadFile(d.cfg.EventLog)
	if err != nil {
		d.log.WithError(err).Warn("no event log: evidence carries the quote only")
		return nil
	}
	return b
}

// dial is the migration node's Dialer: the agent wire's client, or a
// refusal when no TLS is configured.
func (d *Daemon) dial(ctx context.Context, h string) (migrate.Peer, error) {
	if d.wire == nil {
		return nil, fmt.Errorf("%w: no tls configured, this host cannot reach peers", migrate.ErrPeer)
	}
	return d.wire.Dial(ctx, h)
}

func (d *Daemon) target() func(string) (hypervisor.Target, error) {
	if d.deps.Target != nil {
		return d.deps.Target
	}
	return func(h string) (hypervisor.Target, error) {
		if _, static := d.cfg.PeerHypervisors[h]; !static && d.fleet != nil {
			if _, static := d.cfg.Peers[h]; !static {
				addr, err := d.fleet.addr(context.Background(), h)
				if err != nil {
					return hypervisor.Target{}, err
				}
				return hypervisor.Target{Name: h, URI: hypervisorURI(addr)}, nil
			}
		}
		uri, err := d.cfg.PeerHypervisorURI(h)
		if err != nil {
			return hypervisor.Target{}, err
		}
		return hypervisor.Target{Name: h, URI: uri}, nil
	}
}

// peerAddr is a peer's agent wire address: the static peers map, else
// (registry modes) its registered address.
func (d *Daemon) peerAddr(ctx context.Context, h string) (string, error) {
	if addr, ok := d.cfg.Peers[h]; ok {
		return addr, nil
	}
	if addr, ok := d.addrs.Load(h); ok {
		return addr.(string), nil
	}
	if d.fleet == nil {
		return "", fmt.Errorf("%w: %q is not in peers", migrate.ErrPeer, h)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return d.fleet.addr(ctx, h)
}

// listen binds the agent wire (when TLS is configured or a listener is
// given), the admin socket and the metrics listener (when configured).
func (d *Daemon) listen() error {
	var err error
	if d.cfg.TLS.CA != "" || d.deps.WireListener != nil {
		srvTLS, err := d.serverTLS()
		if err != nil {
			return err
		}
		if d.wireLis = d.deps.WireListener; d.wireLis == nil {
			if d.wireLis, err = net.Listen("tcp", d.cfg.Listen); err != nil {
				return fmt.Errorf("listen %s: %w", d.cfg.Listen, err)
			}
		}
		srv := wire.NewServer(d.node, srvTLS, d.log)
		lis := d.wireLis
		d.services = append(d.services, service{"agent wire", func(ctx context.Context) error { return srv.Serve(ctx, lis) }})
	}
	if d.adminLis, err = d.adminListener(); err != nil {
		return err
	}
	admin := d.adminServer()
	d.services = append(d.services, service{"admin api", func(ctx context.Context) error { return serveHTTP(ctx, admin, d.adminLis) }})
	if d.metricsLis = d.deps.MetricsListener; d.metricsLis == nil && d.cfg.MetricsListen != "" {
		if d.metricsLis, err = net.Listen("tcp", d.cfg.MetricsListen); err != nil {
			return fmt.Errorf("metrics: listen %s: %w", d.cfg.MetricsListen, err)
		}
	}
	if lis := d.metricsLis; lis != nil {
		d.services = append(d.services, service{"metrics", func(ctx context.Context) error {
			return metrics.ServeListener(ctx, lis, d.metrics, d.log)
		}})
	}
	d.services = append(d.services, service{"recovery", d.recoveryLoop})
	if d.reg != nil {
		d.services = append(d.services, service{"registry", d.registryLoop})
		d.services = append(d.services, service{"standby", d.standbyLoop})
	}
	if iv, _ := d.cfg.backupInterval(); iv > 0 {
		d.services = append(d.services, service{"backup", d.backupLoop})
	}
	if w, ok := d.hyp.(hypervisor.LifecycleWatcher); ok {
		d.services = append(d.services, service{"lifecycle events", func(ctx context.Context) error { return d.watchLifecycle(ctx, w) }})
	}
	return nil
}

func (d *Daemon) serverTLS() (*tls.Config, error) {
	t := d.cfg.TLS
	if t.CA == "" || t.Cert == "" || t.Key == "" {
		return nil, fmt.Errorf("%w: tls.ca, tls.cert and tls.key are required (vtpmctl pki init / issue)", ErrConfig)
	}
	srv, err := pki.ServerTLS(t.CA, t.Cert, t.Key)
	if err != nil {
		return nil, fmt.Errorf("%w: tls: %w", ErrConfig, err)
	}
	return srv, nil
}

func (d *Daemon) adminListener() (net.Listener, error) {
	if d.deps.AdminListener != nil {
		return d.deps.AdminListener, nil
	}
	p := d.cfg.AdminSocketPath()
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return nil, err
	}
	_ = os.Remove(p)
	lis, err := net.Listen("unix", p)
	if err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", p, err)
	}
	if err := os.Chmod(p, 0o600); err != nil {
		lis.Close()
		return nil, err
	}
	return lis, nil
}

// serveHTTP serves srv on lis until ctx ends, then shuts it down gracefully
// (at most 10 s).
func serveHTTP(ctx context.Context, srv *http.Server, lis net.Listener) error {
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// run reconciles the transactions a crash left open, starts every service
// and closes Ready. A service that fails is reported on Err.
func (d *Daemon) run(ctx context.Context) {
	defer d.served.Done()
	if err := d.node.Reconcile(ctx); err != nil {
		d.log.WithError(err).Warn("recovery left transactions open; retrying in the background")
	}
	d.reunite(ctx)
	if err := d.node.ResumePromotions(ctx); err != nil {
		d.log.WithError(err).Warn("failover: an interrupted promotion is not settled yet")
	}
	for _, s := range d.services {
		d.served.Add(1)
		go func() {
			defer d.served.Done()
			if err := s.serve(ctx); err != nil && ctx.Err() == nil {
				select {
				case d.errc <- fmt.Errorf("%s: %w", s.name, err):
				default:
				}
			}
		}()
	}
	fields := logrus.Fields{"admin": d.cfg.AdminSocketPath()}
	if d.wireLis != nil {
		fields["listen"] = d.wireLis.Addr().String()
	}
	d.log.WithFields(fields).Info("vtpmd serving")
	close(d.ready)
}

// Ready is closed once the daemon serves: open transactions were
// reconciled and every service runs.
func (d *Daemon) Ready() <-chan struct{} { return d.ready }

// Err reports services that failed while the daemon runs (the first few);
// the caller should then Close the daemon.
func (d *Daemon) Err() <-chan error { return d.errc }

// WireAddr is the agent wire's bound address (nil without TLS).
func (d *Daemon) WireAddr() net.Addr { return addr(d.wireLis) }

// AdminAddr is the admin API's bound address (the unix socket).
func (d *Daemon) AdminAddr() net.Addr { return addr(d.adminLis) }

// MetricsAddr is the metrics listener's address (nil when off).
func (d *Daemon) MetricsAddr() net.Addr { return addr(d.metricsLis) }

func addr(l net.Listener) net.Addr {
	if l == nil {
		return nil
	}
	return l.Addr()
}

// Host is the host this daemon runs on: its TPM, vault, key store and VMs.
func (d *Daemon) Host() *host.Host { return d.host }

// Node is the daemon's migration node.
func (d *Daemon) Node() *migrate.Node { return d.node }

// RunsVTPMs reports whether this daemon runs the VMs' vTPMs itself: it has
// no hypervisor (hypervisor.None), which would otherwise run them.
func (d *Daemon) RunsVTPMs() bool { return hypervisor.IsNone(d.hyp) }

// MetricsHandler serves the daemon's Prometheus metrics.
func (d *Daemon) MetricsHandler() http.Handler { return d.metrics.Handler() }

// Close stops the daemon and closes every resource, in this order:
//
//  1. the services: the admin API and metrics shut down gracefully (10 s),
//     the agent wire stops gracefully (wire.DefaultShutdownGrace), the
//     recovery loop and the lifecycle watcher end;
//  2. background work requests started (hook mode's settling);
//  3. the agent wire's client connections;
//  4. the fleet registry: the liveness lease is revoked (the host is at
//     once not live), the client closed, the embedded member stopped;
//  5. the hypervisor connection, when the daemon opened it;
//  6. the audit log, then the ledger;
//  7. the host: the vTPMs it runs stop, the vault key is wiped, the TPM
//     is closed.
//
// Listeners given in Deps are closed too. Close is idempotent and safe
// after a failed Start; it returns the first call's result.
func (d *Daemon) Close(ctx context.Context) error {
	d.closeOnce.Do(func() { d.closeErr = d.close(ctx) })
	return d.closeErr
}

func (d *Daemon) close(ctx context.Context) error {
	var errs []error
	if d.stop != nil {
		d.stop()
		d.served.Wait()
	} else {
		// Start failed before serving: close the listeners it bound.
		for _, l := range []net.Listener{d.wireLis, d.adminLis, d.metricsLis} {
			if l != nil {
				_ = l.Close()
			}
		}
	}
	if d.bgCancel != nil {
		d.bgCancel()
		d.bg.Wait()
	}
	if d.wire != nil {
		errs = append(errs, d.wire.Close())
	}
	if d.reg != nil {
		errs = append(errs, d.reg.Close())
	}
	if d.closeHyp && d.hyp != nil {
		errs = append(errs, hypervisor.Close(d.hyp))
	}
	if d.audit != nil {
		d.recordAuditMark(ctx)
		errs = append(errs, d.audit.Close())
	}
	if d.ledger != nil {
		errs = append(errs, d.ledger.Close())
	}
	if d.host != nil {
		errs = append(errs, d.host.Close(ctx))
	}
	if d.adminLis != nil && d.deps.AdminListener == nil {
		_ = os.Remove(d.cfg.AdminSocketPath())
	}
	return errors.Join(errs...)
}

// auditAdapter writes migrate's audit events to the hash-chained log.
type auditAdapter struct{ l *audit.Log }

func (a auditAdapter) Audit(ctx context.Context, e migrate.AuditEvent) error {
	detail := "tx " + e.TxID
	if e.Detail != "" {
		detail += ": " + e.Detail
	}
	return a.l.Append(ctx, audit.Record{Event: e.Event, VM: e.VM, Peer: e.Peer, Generation: e.Generation, Rule: e.Rule, Detail: detail})
}
