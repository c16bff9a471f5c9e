package registrytest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"
	"time"

	"github.com/vtpmm/vtpmm/migrate/registry"
)

// Fake is an in-memory fleet registry that follows the real one's rules:
// the same compare-and-swap rules (the CAS rule table runs against both),
// the same sentinels, the operator-only writes of RBAC (with RBAC set),
// liveness, standbys and plans. It is for orchestration tests that are not
// about etcd (migration, evacuation, failover logic); tests of the
// registry itself use Start. Fail injects errors per operation.
type Fake struct {
	// RBAC refuses operator operations (Enroll, SetState, Snapshot) to
	// every client but "root", as a bootstrapped registry does.
	RBAC bool
	// Fail, if set, is called with the operation's name ("begin",
	// "commit", "vms", ...) and the client's host before it runs; a
	// non-nil error is returned instead (for example registry.ErrNoQuorum).
	Fail func(op, host string) error

	mu      sync.Mutex
	rev     int64
	hosts   map[string]registry.Host
	states  map[string]registry.HostState
	live    map[string]bool
	enrol   map[string]registry.Enrolment
	vms     map[string]registry.VM
	standby map[string]map[string]registry.Standby
	plans   map[string]fakePlan
	watches []chan registry.LivenessEvent
	rtt     map[string]int64
}

type fakePlan struct {
	p   registry.Plan
	rev int64
}

// NewFake returns an empty fake registry.
func NewFake() *Fake {
	return &Fake{hosts: map[string]registry.Host{}, states: map[string]registry.HostState{}, live: map[string]bool{},
		enrol: map[string]registry.Enrolment{}, vms: map[string]registry.VM{}, standby: map[string]map[string]registry.Standby{},
		plans: map[string]fakePlan{}, rtt: map[string]int64{}}
}

// Client returns the registry as host sees it ("root": the operator).
func (f *Fake) Client(host string) *FakeClient {
	return &FakeClient{f: f, host: host, cache: map[string]registry.VM{}}
}

// Expire ends a host's liveness as a lease expiry does.
func (f *Fake) Expire(host string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.setLive(host, false)
}

// RoundTrips returns the operations host made (each is one round trip on
// the real registry).
func (f *Fake) RoundTrips(host string) int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.rtt[host]
}

func (f *Fake) setLive(host string, live bool) {
	if f.live[host] == live {
		return
	}
	f.rev++
	if live {
		f.live[host] = true
	} else {
		delete(f.live, host)
	}
	for _, w := range f.watches {
		select {
		case w <- registry.LivenessEvent{Host: host, Live: live, Rev: f.rev}:
		default: // a watcher that does not read loses events, as a slow etcd watcher is cancelled
		}
	}
}

// FakeClient is one host's handle on a Fake.
type FakeClient struct {
	f      *Fake
	host   string
	cache  map[string]registry.VM
	crev   int64
	closed bool
}

var _ registry.Registry = (*FakeClient)(nil)

// begin locks the fake and runs the injected failure; the caller unlocks.
func (c *FakeClient) begin(op string) error {
	c.f.mu.Lock()
	if c.closed {
		c.f.mu.Unlock()
		return fmt.Errorf("registry: %s: %w", op, registry.ErrClosed)
	}
	c.f.rtt[c.host]++
	if c.f.Fail != nil {
		if err := c.f.Fail(op, c.host); err != nil {
			c.f.mu.Unlock()
			return fmt.Errorf("registry: %s: %w", op, err)
		}
	}
	return nil
}

func (c *FakeClient) operator(op string) error {
	if c.f.RBAC && c.host != "root" {
		return fmt.Errorf("registry: %s: %w", op, registry.ErrPermission)
	}
	return nil
}

func (c *FakeClient) remember(vms ...registry.VM) {
	for _, v := range vms {
		c.cache[v.ID] = v
	}
	c.crev = c.f.rev
}

// Register implements registry.Fleet.
func (c *FakeClient) Register(_ context.Context, h registry.Host) error {
	if err := c.begin("register"); err != nil {
		return err
	}
	defer c.f.mu.Unlock()
	if h.Name != c.host {
		return fmt.Errorf("registry: register %s: %w: a host registers itself only", h.Name, registry.ErrConfig)
	}
	h.V = registry.Version
	if _, err := registry.DecodeHost(mustJSON(h)); err != nil {
		return fmt.Errorf("registry: register %s: %w", h.Name, err)
	}
	c.f.rev++
	c.f.hosts[h.Name] = h
	c.f.setLive(h.Name, true)
	return nil
}

// Hosts implements registry.Fleet.
func (c *FakeClient) Hosts(_ context.Context, names ...string) (registry.HostsView, error) {
	if err := c.begin("hosts"); err != nil {
		return registry.HostsView{}, err
	}
	defer c.f.mu.Unlock()
	v := registry.HostsView{Rev: c.f.rev, Hosts: map[string]registry.HostView{}}
	all := map[string]bool{}
	for n := range c.f.hosts {
		all[n] = true
	}
	for n := range c.f.enrol {
		all[n] = true
	}
	for n := range c.f.live {
		all[n] = true
	}
	if len(names) > 0 {
		want := map[string]bool{}
		for _, n := range names {
			want[n] = all[n]
		}
		all = want
	}
	for n, ok := range all {
		if !ok {
			continue
		}
		hv := registry.HostView{Name: n, State: c.f.states[n], Live: c.f.live[n]}
		if h, ok := c.f.hosts[n]; ok {
			hv.Host = &h
		}
		if e, ok := c.f.enrol[n]; ok {
			hv.Enrolment = &e
		}
		v.Hosts[n] = hv
	}
	return v, nil
}

// WatchLiveness implements registry.Fleet (events from now on; fromRev is
// not replayed by the fake).
func (c *FakeClient) WatchLiveness(ctx context.Context, _ int64) <-chan registry.LivenessEvent {
	in := make(chan registry.LivenessEvent, 64)
	out := make(chan registry.LivenessEvent)
	c.f.mu.Lock()
	c.f.watches = append(c.f.watches, in)
	c.f.mu.Unlock()
	go func() {
		defer close(out)
		defer func() {
			c.f.mu.Lock()
			for i, w := range c.f.watches {
				if w == in {
					c.f.watches = append(c.f.watches[:i], c.f.watches[i+1:]...)
					break
				}
			}
			c.f.mu.Unlock()
		}()
		for {
			select {
			case <-ctx.Done():
				return
			case e := <-in:
				select {
				case out <- e:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out
}

// Enroll implements registry.Fleet.
func (c *FakeClient) Enroll(_ context.Context, e registry.Enrolment) error {
	if err := c.begin("enrol"); err != nil {
		return err
	}
	defer c.f.mu.Unlock()
	if err := c.operator("enrol " + e.Host); err != nil {
		return err
	}
	e.V = registry.Version
	e.Replaced = nil // written by Reenroll only
	if e.At.IsZero() {
		e.At = time.Now().UTC()
	}
	if e.By == "" {
		e.By = c.host
	}
	if _, err := registry.DecodeEnrolment(mustJSON(e)); err != nil {
		return fmt.Errorf("registry: enrol %s: %w", e.Host, err)
	}
	if old, ok := c.f.enrol[e.Host]; ok {
		if old.Identity == e.Identity {
			return nil
		}
		return fmt.Errorf("registry: enrol %s: %w: the host is enrolled with another TPM identity (rule enrolled-once); if its TPM was replaced: vtpmctl host retire, then vtpmctl host reenroll", e.Host, registry.ErrExists)
	}
	c.f.rev++
	c.f.enrol[e.Host] = e
	if _, ok := c.f.states[e.Host]; !ok {
		c.f.states[e.Host] = registry.StateActive
	}
	return nil
}

// Reenroll implements registry.Fleet with the registry's rules
// (registry.Reenrolment).
func (c *FakeClient) Reenroll(_ context.Context, e registry.Enrolment) (registry.Enrolment, error) {
	if err := c.begin("reenrol"); err != nil {
		return registry.Enrolment{}, err
	}
	defer c.f.mu.Unlock()
	op := "registry: re-enrol " + e.Host
	if err := c.operator("re-enrol " + e.Host); err != nil {
		return registry.Enrolment{}, err
	}
	if e.By == "" {
		e.By = c.host
	}
	old, ok := c.f.enrol[e.Host]
	if !ok {
		return registry.Enrolment{}, fmt.Errorf("%s: %w (rule enrolled): enrol it with vtpmctl host enroll", op, registry.ErrNotEnrolled)
	}
	rec, err := registry.Reenrolment(old, c.f.states[e.Host], e, time.Now())
	if err != nil {
		return registry.Enrolment{}, fmt.Errorf("%s: %w", op, err)
	}
	if _, err := registry.DecodeEnrolment(mustJSON(rec)); err != nil {
		return registry.Enrolment{}, fmt.Errorf("%s: %w", op, err)
	}
	c.f.rev++
	c.f.enrol[e.Host] = rec
	c.f.states[e.Host] = registry.StateActive
	return rec, nil
}

// SetState implements registry.Fleet.
func (c *FakeClient) SetState(_ context.Context, host string, s registry.HostState) error {
	if err := c.begin("set state"); err != nil {
		return err
	}
	defer c.f.mu.Unlock()
	if err := c.operator("set state of " + host); err != nil {
		return err
	}
	if s != registry.StateActive && s != registry.StateDraining && s != registry.StateFenced {
		return fmt.Errorf("registry: set %s %s: %w", host, s, registry.ErrBadRecord)
	}
	if _, ok := c.f.enrol[host]; !ok {
		return fmt.Errorf("registry: set %s %s: %w (rule enrolled)", host, s, registry.ErrNotEnrolled)
	}
	c.f.rev++
	c.f.states[host] = s
	return nil
}

// PutStandby implements registry.Records.
func (c *FakeClient) PutStandby(_ context.Context, s registry.Standby) error {
	if err := c.begin("put standby"); err != nil {
		return err
	}
	defer c.f.mu.Unlock()
	s.V = registry.Version
	if s.Updated.IsZero() {
		s.Updated = time.Now().UTC()
	}
	if _, err := registry.DecodeStandby(mustJSON(s)); err != nil {
		return fmt.Errorf("registry: put standby: %w", err)
	}
	c.f.rev++
	if c.f.standby[s.VM] == nil {
		c.f.standby[s.VM] = map[string]registry.Standby{}
	}
	c.f.standby[s.VM][s.Host] = s
	return nil
}

// DropStandby implements registry.Records.
func (c *FakeClient) DropStandby(_ context.Context, vm, host string) error {
	if err := c.begin("drop standby"); err != nil {
		return err
	}
	defer c.f.mu.Unlock()
	c.f.rev++
	delete(c.f.standby[vm], host)
	return nil
}

// Standbys implements registry.Records.
func (c *FakeClient) Standbys(_ context.Context, vm string) ([]registry.Standby, error) {
	if err := c.begin("standbys"); err != nil {
		return nil, err
	}
	defer c.f.mu.Unlock()
	var out []registry.Standby
	for _, s := range c.f.standby[vm] {
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Host < out[j].Host })
	return out, nil
}

// Plan implements registry.Records.
func (c *FakeClient) Plan(_ context.Context, source string) (registry.Plan, int64, error) {
	if err := c.begin("plan"); err != nil {
		return registry.Plan{}, 0, err
	}
	defer c.f.mu.Unlock()
	p, ok := c.f.plans[source]
	if !ok {
		return registry.Plan{}, 0, fmt.Errorf("registry: evacuation plan of %s: %w", source, registry.ErrNotFound)
	}
	return p.p, p.rev, nil
}

// PutPlan implements registry.Records.
func (c *FakeClient) PutPlan(_ context.Context, p registry.Plan, rev int64) (int64, error) {
	if err := c.begin("put plan"); err != nil {
		return 0, err
	}
	defer c.f.mu.Unlock()
	p.V = registry.Version
	now := time.Now().UTC()
	if p.Created.IsZero() {
		p.Created = now
	}
	p.Updated = now
	if _, err := registry.DecodePlan(mustJSON(p)); err != nil {
		return 0, fmt.Errorf("registry: put plan: %w", err)
	}
	if c.f.plans[p.Source].rev != rev {
		return 0, fmt.Errorf("registry: put evacuation plan of %s: %w", p.Source, registry.ErrConflict)
	}
	c.f.rev++
	c.f.plans[p.Source] = fakePlan{p: p, rev: c.f.rev}
	return c.f.rev, nil
}

// DeletePlan implements registry.Records.
func (c *FakeClient) DeletePlan(_ context.Context, source string, rev int64) error {
	if err := c.begin("delete plan"); err != nil {
		return err
	}
	defer c.f.mu.Unlock()
	if c.f.plans[source].rev != rev {
		return fmt.Errorf("registry: delete evacuation plan of %s: %w", source, registry.ErrConflict)
	}
	c.f.rev++
	delete(c.f.plans, source)
	return nil
}

// Snapshot implements registry.Registry: a JSON dump of the VM records.
func (c *FakeClient) Snapshot(_ context.Context, w io.Writer) error {
	if err := c.begin("snapshot"); err != nil {
		return err
	}
	defer c.f.mu.Unlock()
	if err := c.operator("snapshot"); err != nil {
		return err
	}
	return json.NewEncoder(w).Encode(mapVMs(c.f.vms))
}

// Close implements registry.Registry: the host is no longer live.
func (c *FakeClient) Close() error {
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	if !c.closed {
		c.closed = true
		c.f.setLive(c.host, false)
	}
	return nil
}

func mapVMs(m map[string]registry.VM) []registry.VM {
	out := make([]registry.VM, 0, len(m))
	for _, v := range m {
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

func mustJSON(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

func joinErrs(errs []error) error { return errors.Join(errs...) }
