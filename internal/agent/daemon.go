package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/internal/metrics"
	"github.com/vtpmm/vtpmm/internal/pki"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/wire"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// DaemonOptions are a daemon's injected dependencies.
type DaemonOptions struct {
	Options
	// Hypervisor runs this host's VMs; nil: the configured one, opened
	// through Hypervisors (hypervisor.None when none is configured).
	Hypervisor hypervisor.Hypervisor
	// Hypervisors opens the configured hypervisor URI (cmd/vtpmd registers
	// hypervisor/libvirt's schemes).
	Hypervisors *hypervisor.Registry
	// Target maps a host to its hypervisor migration target
	// (default: {Name: host}).
	Target func(host string) (hypervisor.Target, error)
	// Enrollments overrides attestation.enrollments (tests, demos).
	Enrollments attest.Enrollments
	// WireListener, AdminListener override listen / admin_socket (tests).
	WireListener, AdminListener net.Listener
	// Crash is the migrate crash hook (tests only).
	Crash migrate.CrashHook
}

// Daemon is a running vtpmd: the agent (vault open), the migration node,
// the agent wire, the admin API, metrics and the audit log.
type Daemon struct {
	*Agent
	node    *migrate.Node
	ledger  *migrate.Ledger
	audit   *audit.Log
	metrics *metrics.Metrics
	ident   *identity.Identity
	hyp     hypervisor.Hypervisor
	enroll  attest.Enrollments // where enrolments are recorded (the verifier's store)
	dial    migrate.Dialer     // one client, its connections cached per peer
	closers []func() error
	dopts   DaemonOptions

	// Background work started by requests (hook mode's settling) runs
	// under bgCtx, cancelled when Serve ends; bg tracks it.
	bgCtx    context.Context
	bgCancel context.CancelFunc
	bg       sync.WaitGroup
	settling sync.Map // VM UUID -> struct{}: a settle is scheduled (settle)
}

// StartDaemon opens everything a running vtpmd needs. Serve then serves
// until ctx ends.
func StartDaemon(ctx context.Context, cfg Config, opts DaemonOptions) (_ *Daemon, err error) {
	a, err := Open(ctx, cfg, opts.Options)
	if err != nil {
		return nil, err
	}
	d := &Daemon{Agent: a, hyp: opts.Hypervisor, dopts: opts, metrics: metrics.New()}
	d.bgCtx, d.bgCancel = context.WithCancel(context.WithoutCancel(ctx))
	defer func() {
		if err != nil {
			d.closeAll(context.WithoutCancel(ctx))
		}
	}()
	if d.ident, err = identity.LoadIdentity(ctx, a.meter, identity.LoadOptions{}); err != nil {
		return nil, fmt.Errorf("start daemon: %w (run 'vtpmd init' or 'vtpmd evidence provision')", err)
	}
	if d.ledger, err = migrate.OpenLedger(filepath.Join(cfg.DataDir, "ledger.db"), a.opts.Now); err != nil {
		return nil, err
	}
	if d.audit, err = audit.Open(cfg.auditLogPath(), audit.Options{Host: cfg.HostID, Now: a.opts.Now, Log: a.log}); err != nil {
		return nil, err
	}
	verifier, err := d.verifier(cfg, opts)
	if err != nil {
		return nil, err
	}
	if verifier != nil {
		d.enroll = verifier.Enrollments
	}
	maxAge, _ := cfg.evidenceMaxAge()
	var eventLog []byte
	if cfg.EventLog != "" {
		if eventLog, err = os.ReadFile(cfg.EventLog); err != nil {
			a.log.WithError(err).Warn("no event log: evidence carries the quote only")
			eventLog = nil
		}
	}
	if d.hyp == nil {
		hyp, err := opts.Hypervisors.Open(ctx, hypervisor.Config{URI: cfg.Hypervisor, Name: cfg.HostID, Log: a.log})
		if err != nil {
			return nil, fmt.Errorf("start daemon: %w", err)
		}
		d.closers = append(d.closers, func() error { return hypervisor.Close(hyp) })
		d.hyp = hyp
	}
	target := opts.Target
	if target == nil {
		target = func(h string) (hypervisor.Target, error) {
			uri, err := cfg.PeerHypervisorURI(h)
			if err != nil {
				return hypervisor.Target{}, err
			}
			return hypervisor.Target{Name: h, URI: uri}, nil
		}
	}
	if d.dial, err = d.dialer(cfg); err != nil {
		return nil, err
	}
	d.node = migrate.NewNode(migrate.Config{
		Host: cfg.HostID, Keys: a.keys, TPM: a.meter, Identity: d.ident, Hypervisor: d.hyp, Ledger: d.ledger,
		Verifier: verifier, QuotePCRs: quotePCRs(verifier), EventLog: eventLog,
		Dial: d.dial, Target: target, EvidenceMaxAge: maxAge, Crash: opts.Crash,
		Audit: auditAdapter{d.audit}, Metrics: d.metrics, Now: a.opts.Now, Log: a.log,
	})
	d.metrics.SetTPMCounter(func() map[string]int {
		out := map[string]int{}
		for cc, n := range a.meter.Stats().ByCode {
			out[vtpm.CommandName(cc)] = n
		}
		return out
	})
	return d, nil
}

func (d *Daemon) verifier(cfg Config, opts DaemonOptions) (*attest.Verifier, error) {
	v := &attest.Verifier{Clock: d.opts.Now, Log: d.log, Enrollments: opts.Enrollments}
	var err error
	if cfg.Attestation.Policy == "" {
		// This host can receive vTPMs but not send them: no destination can
		// be verified. Migrate says so.
		return nil, nil
	}
	if v.Policy, err = attest.LoadPolicy(cfg.Attestation.Policy); err != nil {
		return nil, fmt.Errorf("%w: attestation.policy: %w", ErrConfig, err)
	}
	if v.Roots, err = attest.LoadRootStore(cfg.Attestation.Roots...); err != nil {
		return nil, fmt.Errorf("%w: attestation.roots: %w", ErrConfig, err)
	}
	if v.Enrollments == nil {
		if cfg.Attestation.Enrollments == "" {
			return nil, fmt.Errorf("%w: attestation.enrollments is required", ErrConfig)
		}
		v.Enrollments = &attest.FileEnrollments{Path: cfg.Attestation.Enrollments}
	}
	return v, nil
}

func (d *Daemon) tlsFiles() (*tls.Config, *tls.Config, error) {
	t := d.cfg.TLS
	if t.CA == "" || t.Cert == "" || t.Key == "" {
		return nil, nil, fmt.Errorf("%w: tls.ca, tls.cert and tls.key are required (vtpmctl pki init / issue)", ErrConfig)
	}
	srv, err := pki.ServerTLS(t.CA, t.Cert, t.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: tls: %w", ErrConfig, err)
	}
	cli, err := pki.ClientTLS(t.CA, t.Cert, t.Key, d.cfg.HostID)
	return srv, cli, err
}

func (d *Daemon) dialer(cfg Config) (migrate.Dialer, error) {
	if cfg.TLS.CA == "" {
		return func(context.Context, string) (migrate.Peer, error) {
			return nil, fmt.Errorf("%w: no tls configured, this agent cannot reach peers", migrate.ErrPeer)
		}, nil
	}
	t := cfg.TLS
	c := wire.NewClient(
		func(host string) (*tls.Config, error) { return pki.ClientTLS(t.CA, t.Cert, t.Key, host) },
		func(host string) (string, error) {
			addr, ok := cfg.Peers[host]
			if !ok {
				return "", fmt.Errorf("%w: %q is not in peers", migrate.ErrPeer, host)
			}
			return addr, nil
		})
	d.closers = append(d.closers, c.Close)
	return c.Dial, nil
}

func quotePCRs(v *attest.Verifier) map[attest.Bank][]int {
	if v == nil {
		return nil
	}
	return identity.PCRsForPolicy(v.Policy)
}

// Serve runs the agent wire, the admin API and metrics until ctx ends,
// reconciling open transactions first. It then shuts down gracefully.
func (d *Daemon) Serve(ctx context.Context) error {
	defer d.closeAll(context.WithoutCancel(ctx))
	if err := d.node.Reconcile(ctx); err != nil {
		d.log.WithError(err).Warn("recovery left transactions open; retrying in the background")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 5) // one per service below
	run := func(name string, f func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(); err != nil && !errors.Is(err, context.Canceled) {
				errs <- fmt.Errorf("%s: %w", name, err)
				cancel()
			}
		}()
	}
	if d.cfg.TLS.CA != "" || d.dopts.WireListener != nil {
		srvTLS, _, err := d.tlsFiles()
		if err != nil {
			return err
		}
		lis := d.dopts.WireListener
		if lis == nil {
			if lis, err = net.Listen("tcp", d.cfg.Listen); err != nil {
				return fmt.Errorf("listen %s: %w", d.cfg.Listen, err)
			}
		}
		srv := wire.NewServer(d.node, srvTLS, d.log)
		run("agent wire", func() error { return srv.Serve(ctx, lis) })
		d.log.WithField("listen", lis.Addr().String()).Info("agent wire listening")
	}
	admin, err := d.adminListener()
	if err != nil {
		return err
	}
	run("admin api", func() error { return d.serveAdmin(ctx, admin) })
	if d.cfg.MetricsListen != "" {
		run("metrics", func() error { return metrics.Serve(ctx, d.cfg.MetricsListen, d.metrics, d.log) })
	}
	run("recovery", func() error { return d.recoveryLoop(ctx) })
	if w, ok := d.hyp.(hypervisor.LifecycleWatcher); ok {
		run("lifecycle events", func() error { return d.watchLifecycle(ctx, w) })
	}
	d.log.WithFields(logrus.Fields{"admin": d.cfg.AdminSocketPath()}).Info("vtpmd serving")
	<-ctx.Done()
	wg.Wait()
	close(errs)
	var all []error
	for e := range errs {
		all = append(all, e)
	}
	return errors.Join(all...)
}

func (d *Daemon) closeAll(ctx context.Context) {
	d.bgCancel()
	d.bg.Wait()
	for _, c := range d.closers {
		_ = c()
	}
	if d.audit != nil {
		_ = d.audit.Close()
	}
	if d.ledger != nil {
		_ = d.ledger.Close()
	}
	_ = d.Agent.Close(ctx)
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

// RunsVTPMs reports whether this daemon runs the VMs' vTPMs itself: it has
// no hypervisor (hypervisor.None), which would otherwise run them.
func (d *Daemon) RunsVTPMs() bool { return hypervisor.IsNone(d.hyp) }

// MetricsHandler serves the daemon's Prometheus metrics.
func (d *Daemon) MetricsHandler() http.Handler { return d.metrics.Handler() }
