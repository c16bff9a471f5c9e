package daemon

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/member"
)

// The fleet registry in the daemon (registry mode embedded or etcd): the
// daemon opens it in Start (embedded: its etcd member starts in-process)
// and closes it in Close; it registers this host (wire address, TPM
// identity) with a liveness lease; peers are discovered from it; every
// host trusts its enrolment records; and the ownership sync
// (migrate.Node.SyncOwnership) runs at start and on every recovery tick.

// openRegistry opens the configured registry (nil in mode none).
func (d *Daemon) openRegistry(ctx context.Context) error {
	rc := d.cfg.RegistryConfig()
	if rc.Mode == registry.ModeNone {
		return nil
	}
	rc.StartMember = member.Start
	rc.Log = d.log
	rc.Now = d.now
	c, err := registry.OpenClient(ctx, rc)
	if err != nil {
		return fmt.Errorf("start daemon: registry: %w", err)
	}
	d.reg = c
	d.fleet = &fleetView{reg: c, now: d.now}
	return nil
}

// RegistryClient is the daemon's fleet registry client (nil in registry
// mode none): its member's readiness, round-trip counts, last view.
func (d *Daemon) RegistryClient() *registry.Client { return d.reg }

// migrateRegistry is the registry as the migration node takes it: a nil
// interface in mode none.
func (d *Daemon) migrateRegistry() migrate.Registry {
	if d.reg == nil {
		return nil
	}
	return d.reg
}

// registeredFunc is the node's Config.Registered (nil without a registry).
func (d *Daemon) registeredFunc() func(context.Context) error {
	if d.reg == nil {
		return nil
	}
	return d.waitRegistered
}

// identity is this host's TPM identity as it registers it: hex of the
// EK's digest (SHA-256 of its public area), the AK's and the MK's names.
func (d *Daemon) tpmIdentity() (registry.Identity, error) {
	ek, err := attest.ParsePublic("EK", d.ident.EK.Public)
	if err != nil {
		return registry.Identity{}, err
	}
	return registry.Identity{EK: hex.EncodeToString(ek.Digest()), AK: hex.EncodeToString(d.ident.AK.Name),
		MK: hex.EncodeToString(d.ident.MK.Name)}, nil
}

// advertise is the agent wire address other hosts dial.
func (d *Daemon) advertise() (string, error) {
	if d.cfg.Advertise != "" {
		return d.cfg.Advertise, nil
	}
	if d.wireLis == nil {
		return "", fmt.Errorf("%w: no agent wire to advertise", ErrConfig)
	}
	a := d.wireLis.Addr().String()
	if h, _, err := net.SplitHostPort(a); err == nil {
		if ip := net.ParseIP(h); ip != nil && ip.IsUnspecified() {
			return "", fmt.Errorf("%w: listen %s is a wildcard: set advertise to the address other hosts dial", ErrConfig, a)
		}
	}
	return a, nil
}

// registryLoop registers this host (retrying while the registry has no
// quorum or this host has no etcd user yet: 'vtpmctl registry add-host'
// or 'host enroll' creates it), forwards the embedded member's failures,
// and runs the ownership sync at start and on every recovery tick.
func (d *Daemon) registryLoop(ctx context.Context) error {
	id, err := d.tpmIdentity()
	if err != nil {
		return err
	}
	addr, err := d.advertise()
	if err != nil {
		return err
	}
	self := registry.Host{Name: d.cfg.HostID, Addr: addr, Identity: id}
	registered := false
	backoff := 250 * time.Millisecond
	nextSync := time.Now()
	for {
		if !registered {
			rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := d.reg.Register(rctx, self)
			cancel()
			if err == nil {
				registered = true
				close(d.registered)
				d.log.WithField("addr", addr).Info("registered in the fleet registry")
			} else if ctx.Err() == nil {
				d.log.WithError(err).Debug("registering in the fleet registry; retrying")
			}
		}
		if !time.Now().Before(nextSync) {
			d.syncOwnership(ctx)
			nextSync = time.Now().Add(RecoveryInterval)
		}
		wait := RecoveryInterval / 3
		if !registered {
			wait = backoff
			backoff = min(2*backoff, 5*time.Second)
		}
		select {
		case <-ctx.Done():
			return nil
		case err := <-d.reg.Err():
			return fmt.Errorf("registry member: %w", err)
		case <-d.syncNow:
			nextSync = time.Now()
		case <-time.After(wait):
		}
	}
}

// syncOwnership runs the node's ownership sync and logs what it did.
func (d *Daemon) syncOwnership(ctx context.Context) {
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	rep, err := d.node.SyncOwnership(sctx)
	fields := logrus.Fields{"agree": len(rep.Agree), "raised": rep.Raised, "aborted": rep.Aborted, "stale": rep.Stale,
		"shredded": rep.Shredded, "conflicts": rep.Conflicts}
	switch {
	case errors.Is(err, migrate.ErrRegistryUnavailable):
		d.log.WithError(err).Debug("ownership sync: registry unavailable; retrying")
	case err != nil:
		d.log.WithError(err).WithFields(fields).Warn("ownership sync")
	case len(rep.Raised)+len(rep.Aborted)+len(rep.Stale)+len(rep.Shredded)+len(rep.Conflicts) > 0:
		d.log.WithFields(fields).Info("ownership sync")
	}
}

// requestSync asks the registry loop to sync soon (a refused start).
func (d *Daemon) requestSync() {
	if d.reg == nil {
		return
	}
	select {
	case d.syncNow <- struct{}{}:
	default:
	}
}

// fleetView is this host's cached view of the registry's hosts (records,
// states, liveness, enrolments): peers' addresses and enrolments come
// from it. It is read again when older than fleetViewAge, or at once when
// a lookup misses (at most every fleetViewMiss).
type fleetView struct {
	reg registry.Fleet
	now func() time.Time

	mu   sync.Mutex
	view registry.HostsView
	at   time.Time
	// changes is the registry's count of enrolment changes when view was
	// read (enrolmentWatcher): a view read before a host was re-enrolled
	// is not used after the watch delivered the change.
	changes uint64
}

// enrolmentWatcher is the registry client's count of enrolment changes
// its watch delivered (registry.Client.EnrolmentChanges).
type enrolmentWatcher interface{ EnrolmentChanges() uint64 }

// enrolChanges is the registry's count of enrolment changes (0 without a
// watch).
func (f *fleetView) enrolChanges() uint64 {
	if w, ok := f.reg.(enrolmentWatcher); ok {
		return w.EnrolmentChanges()
	}
	return 0
}

const (
	fleetViewAge  = 5 * time.Second
	fleetViewMiss = time.Second
)

// get returns the hosts view, reading it again when it is older than
// maxAge.
func (f *fleetView) get(ctx context.Context, maxAge time.Duration) (registry.HostsView, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	changes := f.enrolChanges()
	if f.view.Hosts != nil && f.now().Sub(f.at) < maxAge && changes == f.changes {
		return f.view, nil
	}
	v, err := f.reg.Hosts(ctx)
	if err != nil {
		if f.view.Hosts != nil {
			return f.view, nil // the last view, while the registry is unavailable
		}
		return registry.HostsView{}, err
	}
	f.view, f.at, f.changes = v, f.now(), changes
	return v, nil
}

// lookup finds a host, reading the registry again on a miss.
func (f *fleetView) lookup(ctx context.Context, name string, ok func(registry.HostView) bool) (registry.HostView, error) {
	v, err := f.get(ctx, fleetViewAge)
	if err != nil {
		return registry.HostView{}, err
	}
	if h, found := v.Hosts[name]; found && ok(h) {
		return h, nil
	}
	if v, err = f.get(ctx, fleetViewMiss); err != nil {
		return registry.HostView{}, err
	}
	return v.Hosts[name], nil
}

// addr is a host's registered wire address.
func (f *fleetView) addr(ctx context.Context, name string) (string, error) {
	h, err := f.lookup(ctx, name, func(h registry.HostView) bool { return h.Host != nil })
	if err != nil {
		return "", fmt.Errorf("%w: %s: fleet registry: %w", migrate.ErrPeer, name, err)
	}
	if h.Host == nil {
		return "", fmt.Errorf("%w: %s has not registered in the fleet registry (is its vtpmd running, and its etcd user added: vtpmctl registry add-host?)", migrate.ErrPeer, name)
	}
	return h.Host.Addr, nil
}

// names lists the registered hosts other than self.
func (f *fleetView) names(ctx context.Context, self string) []string {
	v, err := f.get(ctx, fleetViewAge)
	if err != nil {
		return nil
	}
	var out []string
	for n, h := range v.Hosts {
		if n != self && h.Host != nil {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

// regEnrollments is the verifier's enrolment store in registry mode: the
// operator's records in the registry, which every host trusts (joining an
// N-host fleet costs one enrolment). Hosts never write them.
type regEnrollments struct{ f *fleetView }

var (
	_ attest.Enrollments      = regEnrollments{}
	_ attest.EnrollmentFinder = regEnrollments{}
	_ attest.HostFinder       = regEnrollments{}
)

// Find implements attest.EnrollmentFinder.
func (r regEnrollments) Find(ctx context.Context, ekDigest, akName []byte) (*attest.Enrollment, error) {
	ek, ak := hex.EncodeToString(ekDigest), hex.EncodeToString(akName)
	match := func(h registry.HostView) bool {
		return h.Enrolment != nil && h.Enrolment.Identity.EK == ek && h.Enrolment.Identity.AK == ak
	}
	return r.find(ctx, match)
}

// FindHost implements attest.HostFinder: the registry's enrolment of
// host (the migration engine answers enrolled hosts only).
func (r regEnrollments) FindHost(ctx context.Context, host string) (*attest.Enrollment, error) {
	match := func(h registry.HostView) bool { return h.Enrolment != nil && h.Enrolment.Host == host }
	return r.find(ctx, match)
}

// find returns the enrolment match selects in the fleet's view, reading
// the registry again (a fresher view) when the cached one has none.
func (r regEnrollments) find(ctx context.Context, match func(registry.HostView) bool) (*attest.Enrollment, error) {
	v, err := r.f.get(ctx, fleetViewAge)
	if err != nil {
		return nil, err
	}
	rec := findEnrolment(v, match)
	if rec == nil {
		if v, err = r.f.get(ctx, fleetViewMiss); err != nil {
			return nil, err
		}
		rec = findEnrolment(v, match)
	}
	return toAttestEnrollment(rec), nil
}

// toAttestEnrollment is a registry enrolment as package attest records
// it; nil for nil.
func toAttestEnrollment(rec *registry.Enrolment) *attest.Enrollment {
	if rec == nil {
		return nil
	}
	out := &attest.Enrollment{Host: rec.Host, EnrolledAt: rec.At, Method: rec.Method}
	out.EKDigest, _ = hex.DecodeString(rec.Identity.EK)
	out.AKName, _ = hex.DecodeString(rec.Identity.AK)
	if rec.AKCert != "" {
		out.AKCertDigest, _ = hex.DecodeString(rec.AKCert)
	}
	return out
}

func findEnrolment(v registry.HostsView, match func(registry.HostView) bool) *registry.Enrolment {
	names := make([]string, 0, len(v.Hosts))
	for n := range v.Hosts {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if h := v.Hosts[n]; match(h) {
			return h.Enrolment
		}
	}
	return nil
}

// Activated implements attest.Enrollments.
func (r regEnrollments) Activated(ctx context.Context, ekDigest, akName []byte) (bool, error) {
	e, err := r.Find(ctx, ekDigest, akName)
	return e != nil, err
}

// Add implements attest.Enrollments: hosts do not write enrolments.
func (regEnrollments) Add(context.Context, attest.Enrollment) error {
	return fmt.Errorf("%w: with a fleet registry the operator records enrolments (vtpmctl host enroll)", migrate.ErrRefused)
}

// captureEnrollment keeps the record an enrolment check produced, for
// the operator to write to the registry.
type captureEnrollment struct{ rec *attest.Enrollment }

func (c *captureEnrollment) Add(_ context.Context, e attest.Enrollment) error {
	c.rec = &e
	return nil
}

func (c *captureEnrollment) Activated(_ context.Context, ekDigest, akName []byte) (bool, error) {
	return c.rec != nil && bytes.Equal(c.rec.EKDigest, ekDigest) && bytes.Equal(c.rec.AKName, akName), nil
}

// RegisterWait bounds how long a start waits for this host's first
// registration (waitRegistered).
const RegisterWait = 10 * time.Second

// waitRegistered is the node's Config.Registered: nil once this vtpmd
// registered in the fleet registry (its liveness key written), after
// waiting at most RegisterWait.
func (d *Daemon) waitRegistered(ctx context.Context) error {
	select {
	case <-d.registered:
		return nil
	default:
	}
	t := time.NewTimer(RegisterWait)
	defer t.Stop()
	select {
	case <-d.registered:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return fmt.Errorf("not registered within %v of the start request (no quorum, or no registry user yet)", RegisterWait)
	}
}
