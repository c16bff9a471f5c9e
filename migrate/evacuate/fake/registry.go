// Package fake holds working fakes of what package evacuate consumes: a
// registry that follows the etcd registry's rules (issue #12: every write a
// compare-and-swap on revisions, ownership commits that compare owner,
// generation and claim, no move to a draining or fenced host, sessions that
// die with their process), hypervisors that follow libvirt's rules for
// encrypted vTPMs (a migration fails when the destination lacks the VM's
// key), and a mover that counts attestations, transfer keys and TPM
// commands per (source, destination) pair and injects failures. They serve
// tests of the evacuation's orchestration; the real components have their
// own tests.
package fake

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/vtpmm/vtpmm/migrate/evacuate"
)

// ErrProcessDied is returned by a Client whose process was killed.
var ErrProcessDied = errors.New("fake: the calling process died")

// Registry is the registry's shared state (the etcd cluster).
type Registry struct {
	mu       sync.Mutex
	rev      int64
	hosts    map[string]*evacuate.Host
	vms      map[string]*evacuate.VMRecord
	records  map[string]record
	sessions map[string]bool
	nextSess int

	rtt      map[string]int // op -> round trips
	txRTT    map[string]int // transaction -> round trips (claim, commit)
	commits  map[string]int // VM -> ownership changes
	vmReads  int
	onVMRead func(reads int)
}

type record struct {
	data []byte
	rev  int64
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{hosts: map[string]*evacuate.Host{}, vms: map[string]*evacuate.VMRecord{},
		records: map[string]record{}, sessions: map[string]bool{}, rtt: map[string]int{},
		txRTT: map[string]int{}, commits: map[string]int{}}
}

// AddHost registers a host (active, live and enrolled unless changed).
func (g *Registry) AddHost(h evacuate.Host) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.hosts[h.Name] = &h
}

// SetHost changes a host's state and liveness.
func (g *Registry) SetHost(name string, state evacuate.HostState, live bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if h := g.hosts[name]; h != nil {
		h.State, h.Live = state, live
	}
}

// Host returns a host's record.
func (g *Registry) Host(name string) evacuate.Host {
	g.mu.Lock()
	defer g.mu.Unlock()
	if h := g.hosts[name]; h != nil {
		return *h
	}
	return evacuate.Host{}
}

// AddVM registers a VM owned by owner at generation gen.
func (g *Registry) AddVM(id, owner string, gen uint64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.rev++
	g.vms[id] = &evacuate.VMRecord{ID: id, Owner: owner, Generation: gen, Revision: g.rev}
}

// VM returns a VM's record.
func (g *Registry) VM(id string) (evacuate.VMRecord, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	r, ok := g.vms[id]
	if !ok {
		return evacuate.VMRecord{}, false
	}
	return *r, true
}

// OnVMRead calls f after every VMs read with the number of reads so far
// (tests use it to let recovery settle a transaction mid-wait).
func (g *Registry) OnVMRead(f func(reads int)) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.onVMRead = f
}

// Recover is vtpmd's recovery against the registry: every open
// transaction is committed to the host where its VM runs when that is not
// the owner (that host promotes its PENDING key, the old owner shreds its
// copy), and dropped otherwise (PENDING keys of the transaction are
// shredded). It returns how many transactions it settled.
func Recover(g *Registry, w *World) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, id := range slices.Sorted(mapsKeys(g.vms)) {
		r := g.vms[id]
		if r.OpenTx == "" {
			continue
		}
		g.rev++
		where := w.runs[id]
		if p, ok := w.pending[where][id]; ok && where != r.Owner && p.tx == r.OpenTx {
			delete(w.pending[where], id)
			w.keys[where][id] = p.gen
			delete(w.keys[r.Owner], id)
			r.Owner, r.Generation = where, p.gen
			g.commits[id]++
		}
		for h := range w.pending {
			if p, ok := w.pending[h][id]; ok && p.tx == r.OpenTx {
				delete(w.pending[h], id)
			}
		}
		r.OpenTx, r.Revision = "", g.rev
		n++
	}
	return n
}

// Commits returns how many times each VM changed owner.
func (g *Registry) Commits() map[string]int {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make(map[string]int, len(g.commits))
	for k, v := range g.commits {
		out[k] = v
	}
	return out
}

// RoundTrips returns the round trips by operation.
func (g *Registry) RoundTrips() map[string]int {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make(map[string]int, len(g.rtt))
	for k, v := range g.rtt {
		out[k] = v
	}
	return out
}

// TxRoundTrips returns the round trips each transaction cost (its claim
// and its commit).
func (g *Registry) TxRoundTrips() map[string]int {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make(map[string]int, len(g.txRTT))
	for k, v := range g.txRTT {
		out[k] = v
	}
	return out
}

// OpenTxs lists the VMs held by an open transaction.
func (g *Registry) OpenTxs() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []string
	for id, r := range g.vms {
		if r.OpenTx != "" {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// Record returns the evacuation record of source.
func (g *Registry) Record(source string) (*evacuate.Record, error) {
	g.mu.Lock()
	r, ok := g.records[source]
	g.mu.Unlock()
	if !ok {
		return nil, evacuate.ErrNotFound
	}
	return evacuate.DecodeRecord(r.data)
}

// Client is one process's connection to the registry, with its session
// (etcd: a client and its lease). Kill makes the process die: its session
// ends and every later call fails.
type Client struct {
	g       *Registry
	session string
	mu      sync.Mutex
	dead    bool
}

var (
	_ evacuate.Fleet     = (*Client)(nil)
	_ evacuate.Ownership = (*Client)(nil)
	_ evacuate.Records   = (*Client)(nil)
)

// Connect opens a client with a new live session.
func (g *Registry) Connect() *Client {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.nextSess++
	s := fmt.Sprintf("session-%d", g.nextSess)
	g.sessions[s] = true
	return &Client{g: g, session: s}
}

// Session is the client's registry session.
func (c *Client) Session() string { return c.session }

// Kill ends the process: its session dies, its calls fail from now on.
func (c *Client) Kill() {
	c.mu.Lock()
	c.dead = true
	c.mu.Unlock()
	c.g.mu.Lock()
	c.g.sessions[c.session] = false
	c.g.mu.Unlock()
}

// begin starts a round trip: it fails when the process died or ctx ended,
// and otherwise returns with the registry locked.
func (c *Client) begin(ctx context.Context, op string) error {
	c.mu.Lock()
	dead := c.dead
	c.mu.Unlock()
	if dead {
		return fmt.Errorf("registry %s: %w", op, ErrProcessDied)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("registry %s: %w", op, err)
	}
	c.g.mu.Lock()
	c.g.rtt[op]++
	return nil
}

// Hosts implements evacuate.Fleet.
func (c *Client) Hosts(ctx context.Context) ([]evacuate.Host, error) {
	if err := c.begin(ctx, "hosts"); err != nil {
		return nil, err
	}
	defer c.g.mu.Unlock()
	out := make([]evacuate.Host, 0, len(c.g.hosts))
	for _, n := range slices.Sorted(mapsKeys(c.g.hosts)) {
		out = append(out, *c.g.hosts[n])
	}
	return out, nil
}

// Drain implements evacuate.Fleet: a fenced host stays fenced.
func (c *Client) Drain(ctx context.Context, host string) error {
	if err := c.begin(ctx, "drain"); err != nil {
		return err
	}
	defer c.g.mu.Unlock()
	h := c.g.hosts[host]
	switch {
	case h == nil:
		return fmt.Errorf("drain %s: %w", host, evacuate.ErrUnknownHost)
	case h.State == evacuate.HostFenced:
		return fmt.Errorf("drain %s: %w", host, evacuate.ErrSourceFenced)
	}
	h.State = evacuate.HostDraining
	return nil
}

// Undrain makes a draining host active again (vtpmctl host undrain).
func (c *Client) Undrain(ctx context.Context, host string) error {
	if err := c.begin(ctx, "undrain"); err != nil {
		return err
	}
	defer c.g.mu.Unlock()
	if h := c.g.hosts[host]; h != nil && h.State == evacuate.HostDraining {
		h.State = evacuate.HostActive
	}
	return nil
}

// VMs implements evacuate.Ownership.
func (c *Client) VMs(ctx context.Context, ids []string) (map[string]evacuate.VMRecord, error) {
	if err := c.begin(ctx, "vms"); err != nil {
		return nil, err
	}
	out := c.g.readLocked(ids)
	c.g.vmReads++
	n, hook := c.g.vmReads, c.g.onVMRead
	c.g.mu.Unlock()
	if hook != nil {
		hook(n)
	}
	return out, nil
}

func (g *Registry) readLocked(ids []string) map[string]evacuate.VMRecord {
	out := make(map[string]evacuate.VMRecord, len(ids))
	for _, id := range ids {
		if r, ok := g.vms[id]; ok {
			out[id] = *r
		}
	}
	return out
}

// activeLocked refuses moves to a host that is not active.
func (g *Registry) activeLocked(dest string) error {
	h := g.hosts[dest]
	switch {
	case h == nil:
		return fmt.Errorf("move to %s: %w", dest, evacuate.ErrUnknownHost)
	case h.State != evacuate.HostActive:
		return fmt.Errorf("move to %s: %w: it is %s", dest, evacuate.ErrHostNotActive, h.State)
	}
	return nil
}

// Claim implements evacuate.Ownership: one Txn comparing every record's
// revision (and that no transaction holds it and the source owns it),
// all or nothing; the else branch reads the records.
func (c *Client) Claim(ctx context.Context, cl evacuate.Claim) (evacuate.ClaimResult, error) {
	if err := c.begin(ctx, "claim"); err != nil {
		return evacuate.ClaimResult{}, err
	}
	g := c.g
	defer g.mu.Unlock()
	g.txRTT[cl.TxID]++
	if err := g.activeLocked(cl.Dest); err != nil {
		return evacuate.ClaimResult{}, err
	}
	ids := slices.Sorted(mapsKeys(cl.Expect))
	for _, id := range ids {
		r, ok := g.vms[id]
		if !ok || r.Revision != cl.Expect[id] || r.OpenTx != "" || r.Owner != cl.Source {
			return evacuate.ClaimResult{OK: false, Records: g.readLocked(ids)}, nil
		}
	}
	g.rev++
	for _, id := range ids {
		g.vms[id].OpenTx, g.vms[id].Revision = cl.TxID, g.rev
	}
	return evacuate.ClaimResult{OK: true, Records: g.readLocked(ids)}, nil
}

// Commit is a batch's group commit (one Txn): every moved VM must still be
// owned by c.Source at generation Moved[id]-1 under claim TxID, and Dest
// must be active; each released VM must be held by TxID. All or nothing.
type Commit struct {
	TxID    string
	Source  string
	Dest    string
	Moved   map[string]uint64 // VM -> new generation
	Release []string          // claims dropped (rolled back)
}

// Commit applies cm in one round trip (ErrConflict, ErrHostNotActive).
func (c *Client) Commit(ctx context.Context, cm Commit) error {
	if err := c.begin(ctx, "commit"); err != nil {
		return err
	}
	g := c.g
	defer g.mu.Unlock()
	g.txRTT[cm.TxID]++
	if len(cm.Moved) > 0 {
		if err := g.activeLocked(cm.Dest); err != nil {
			return err
		}
	}
	for id, gen := range cm.Moved {
		r := g.vms[id]
		if r == nil || r.Owner != cm.Source || r.Generation+1 != gen || r.OpenTx != cm.TxID {
			return fmt.Errorf("commit %s: VM %s: %w", cm.TxID, id, evacuate.ErrConflict)
		}
	}
	for _, id := range cm.Release {
		if r := g.vms[id]; r == nil || r.OpenTx != cm.TxID {
			return fmt.Errorf("commit %s: release %s: %w", cm.TxID, id, evacuate.ErrConflict)
		}
	}
	g.rev++
	for id, gen := range cm.Moved {
		r := g.vms[id]
		r.Owner, r.Generation, r.OpenTx, r.Revision = cm.Dest, gen, "", g.rev
		g.commits[id]++
	}
	for _, id := range cm.Release {
		g.vms[id].OpenTx, g.vms[id].Revision = "", g.rev
	}
	return nil
}

// LoadEvacuation implements evacuate.Records.
func (c *Client) LoadEvacuation(ctx context.Context, source string) ([]byte, int64, error) {
	if err := c.begin(ctx, "load-record"); err != nil {
		return nil, 0, err
	}
	defer c.g.mu.Unlock()
	r, ok := c.g.records[source]
	if !ok {
		return nil, 0, evacuate.ErrNotFound
	}
	return slices.Clone(r.data), r.rev, nil
}

// SaveEvacuation implements evacuate.Records (CAS on the revision).
func (c *Client) SaveEvacuation(ctx context.Context, source string, data []byte, rev int64) (int64, error) {
	if err := c.begin(ctx, "save-record"); err != nil {
		return 0, err
	}
	g := c.g
	defer g.mu.Unlock()
	if g.records[source].rev != rev {
		return 0, fmt.Errorf("save evacuation of %s: %w", source, evacuate.ErrConflict)
	}
	g.rev++
	g.records[source] = record{data: slices.Clone(data), rev: g.rev}
	return g.rev, nil
}

// SessionAlive implements evacuate.Records.
func (c *Client) SessionAlive(ctx context.Context, session string) (bool, error) {
	if err := c.begin(ctx, "session"); err != nil {
		return false, err
	}
	defer c.g.mu.Unlock()
	return c.g.sessions[session], nil
}

func mapsKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}
