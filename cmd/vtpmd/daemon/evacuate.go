package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/errclass"
	"github.com/vtpmm/vtpmm/internal/strictjson"
	"github.com/vtpmm/vtpmm/migrate/evacuate"
	"github.com/vtpmm/vtpmm/migrate/registry"
)

// Host evacuation (issue #13, docs/evacuation.md): POST /v1/evacuate runs
// package evacuate's Evacuator in this vtpmd, the source's, which holds
// what it needs: the registry client and session (the evacuation record,
// the VMs' records, the claims), the hypervisor (the VMs running here) and
// the migration node (one batch per destination through Node.Migrate: one
// attestation and one transfer key per destination). The request's
// context is the run's: the client going away is Ctrl-C.

// unknownFree is the free memory reported for a destination when this
// host's hypervisor cannot tell (no hypervisor.Capacity, no
// Deps.FreeMemory): placement then balances by count alone.
const unknownFree uint64 = 1 << 50

// EvacuationStats counts what this vtpmd's evacuations cost: batches and
// their registry round trips (claims and commits).
type EvacuationStats struct {
	Batches    int
	ClaimRTT   int // registry round trips of the claims (1 per batch, +1 on a conflict)
	CommitRTT  int // registry round trips of the commits (1 per batch, +1 when some VMs were aborted)
	Claims     int
	Conflicts  int
	Migrations int // hypervisor migrations started
}

// evacStats is the daemon's running EvacuationStats, and the stops of the
// evacuations running.
type evacStats struct {
	mu    sync.Mutex
	s     EvacuationStats
	stops map[*context.CancelFunc]bool
}

// StopEvacuations stops every evacuation this vtpmd runs, as Ctrl-C does:
// no new migration starts; those in flight finish and commit; each run
// reports and records where it stopped. It returns how many it stopped.
func (d *Daemon) StopEvacuations() int {
	d.evac.mu.Lock()
	defer d.evac.mu.Unlock()
	for stop := range d.evac.stops {
		(*stop)()
	}
	return len(d.evac.stops)
}

func (d *Daemon) handleEvacuateStop(w http.ResponseWriter, _ *http.Request) {
	adminapi.WriteJSON(w, http.StatusOK, adminapi.EvacuateStopped{Stopped: d.StopEvacuations()})
}

func (e *evacStats) add(f func(*EvacuationStats)) {
	e.mu.Lock()
	defer e.mu.Unlock()
	f(&e.s)
}

// EvacuationStats returns the counts since the daemon started.
func (d *Daemon) EvacuationStats() EvacuationStats {
	d.evac.mu.Lock()
	defer d.evac.mu.Unlock()
	return d.evac.s
}

// Evacuate runs an evacuation of this host with the operator's options,
// sending every event to sink. It returns the report (nil when the
// evacuation could not run) and the error of Evacuator.Run.
func (d *Daemon) Evacuate(ctx context.Context, opts evacuate.Options, sink evacuate.Sink) (*evacuate.Report, error) {
	if d.reg == nil {
		return nil, fmt.Errorf("evacuate %s: %w", d.cfg.HostID, errNoRegistry)
	}
	if d.node == nil || hypervisor.IsNone(d.hyp) {
		return nil, fmt.Errorf("evacuate %s: %w: vtpmd runs without a hypervisor", d.cfg.HostID, evacuate.ErrBadInput)
	}
	session := d.reg.Session()
	if session == "" {
		return nil, fmt.Errorf("evacuate %s: %w: this vtpmd has no registry session yet", d.cfg.HostID, registry.ErrNoQuorum)
	}
	if !opts.DryRun {
		// Settle first what this host left open (a run stopped by a crash,
		// a destination that was down): a transaction committed in the
		// registry whose source never finished still holds the old key
		// here. Transactions in flight in this process are skipped.
		if err := d.node.Reconcile(ctx); err != nil {
			d.log.WithError(err).Warn("evacuation: some open transactions are not settled yet; the run waits for them or reports them open")
		}
	}
	ad := &evacAdapter{d: d, holds: map[string]func(){}}
	e, err := evacuate.New(evacuate.Config{
		Source: d.cfg.HostID, Fleet: ad, Ownership: ad, Records: ad, Inventory: evacInventory{ad}, Capacity: ad, Mover: ad,
		Session: session, HolderID: "vtpmd@" + d.cfg.HostID, Events: sink, Log: d.log,
		SettleTimeout: d.deps.EvacuationSettle,
	})
	if err != nil {
		return nil, err
	}
	return e.Run(ctx, opts)
}

func (d *Daemon) handleEvacuate(w http.ResponseWriter, r *http.Request) {
	var req adminapi.EvacuateRequest
	if err := strictjson.DecodeReader(r.Body, &req, maxAdminRequest); err != nil || req.Host == "" {
		adminapi.WriteError(w, http.StatusBadRequest, fmt.Errorf("want {\"host\": \"HOST\", \"to\": [...], \"parallel\": N, \"dry_run\": bool}"))
		return
	}
	if req.Host != d.cfg.HostID {
		adminapi.WriteError(w, http.StatusBadRequest, fmt.Errorf("evacuate %s: %w: this vtpmd is %s; an evacuation runs on its source (run vtpmctl evacuate on %s)",
			req.Host, evacuate.ErrBadInput, d.cfg.HostID, req.Host))
		return
	}
	if d.reg == nil {
		adminapi.WriteError(w, http.StatusNotFound, errNoRegistry)
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	var mu sync.Mutex
	enc := json.NewEncoder(w)
	flush := func() {
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
	}
	sink := evacuate.SinkFunc(func(ev evacuate.Event) {
		mu.Lock()
		defer mu.Unlock()
		_ = enc.Encode(ev)
		flush()
	})
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	d.evac.mu.Lock()
	if d.evac.stops == nil {
		d.evac.stops = map[*context.CancelFunc]bool{}
	}
	d.evac.stops[&cancel] = true
	d.evac.mu.Unlock()
	defer func() {
		d.evac.mu.Lock()
		delete(d.evac.stops, &cancel)
		d.evac.mu.Unlock()
	}()
	headroom := req.Headroom
	if headroom == 0 {
		headroom = evacuate.DefaultHeadroom
	}
	rep, err := d.Evacuate(ctx, evacuate.Options{To: req.To, Parallel: req.Parallel, Headroom: headroom, DryRun: req.DryRun}, sink)
	end := adminapi.EvacuateEnd{Done: true, ExitCode: evacuate.ExitCode(rep, err)}
	if err != nil {
		end.Error, end.Code, end.Reasons = err.Error(), errclass.CodeOf(err), errclass.Reasons(err)
	}
	mu.Lock()
	_ = enc.Encode(end)
	flush()
	mu.Unlock()
}

// evacAdapter is what the Evacuator needs from this vtpmd: the registry
// (Fleet, Ownership, Records), the hypervisor (Inventory, Capacity) and
// the node (Mover).
type evacAdapter struct {
	d *Daemon

	mu    sync.Mutex
	holds map[string]func() // transaction -> Node.Hold's release, from the claim to the end of its batch
}

var (
	_ evacuate.Fleet     = (*evacAdapter)(nil)
	_ evacuate.Ownership = (*evacAdapter)(nil)
	_ evacuate.Records   = (*evacAdapter)(nil)
	_ evacuate.Inventory = evacInventory{}
	_ evacuate.Capacity  = (*evacAdapter)(nil)
	_ evacuate.Mover     = (*evacAdapter)(nil)
)

// Hosts implements evacuate.Fleet: one round trip.
func (a *evacAdapter) Hosts(ctx context.Context) ([]evacuate.Host, error) {
	v, err := a.d.reg.Hosts(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]evacuate.Host, 0, len(v.Hosts))
	for name, h := range v.Hosts {
		st := evacuate.HostState(h.State)
		if st == "" {
			st = evacuate.HostActive // never enrolled: reported not-enrolled
		}
		out = append(out, evacuate.Host{Name: name, State: st, Live: h.Live, Enrolled: h.Enrolment != nil})
	}
	slices.SortFunc(out, func(x, y evacuate.Host) int { return compareStrings(x.Name, y.Name) })
	return out, nil
}

func compareStrings(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Drain implements evacuate.Fleet. The host's state is the operator's
// (with the registry's RBAC a host may not write it): 'vtpmctl evacuate'
// marks the host draining with the operator's credentials before it asks
// vtpmd, and Drain checks it. Without RBAC it marks it itself.
func (a *evacAdapter) Drain(ctx context.Context, host string) error {
	v, err := a.d.reg.Hosts(ctx, host)
	if err != nil {
		return err
	}
	switch v.Hosts[host].State {
	case registry.StateDraining:
		return nil
	case registry.StateFenced:
		return fmt.Errorf("drain %s: %w", host, evacuate.ErrSourceFenced)
	}
	if err := a.d.reg.SetState(ctx, host, registry.StateDraining); err != nil {
		return fmt.Errorf("drain %s: %w (the operator marks it: vtpmctl host drain %s)", host, err, host)
	}
	return nil
}

// VMs implements evacuate.Ownership: one round trip. A record's Revision
// is its generation: the claim (registry.Begin) compares the whole record
// (owner, generation, no transaction), not etcd's mod_revision.
func (a *evacAdapter) VMs(ctx context.Context, ids []string) (map[string]evacuate.VMRecord, error) {
	out := make(map[string]evacuate.VMRecord, len(ids))
	if len(ids) == 0 {
		return out, nil
	}
	v, err := a.d.reg.VMs(ctx, ids...)
	if err != nil {
		return nil, err
	}
	for id, r := range v.VMs {
		out[id] = vmRecord(r)
	}
	return out, nil
}

func vmRecord(r registry.VM) evacuate.VMRecord {
	rec := evacuate.VMRecord{ID: r.ID, Owner: r.Owner, Generation: r.Generation, Revision: int64(r.Generation)}
	if r.Tx != nil {
		rec.OpenTx = r.Tx.ID
	}
	return rec
}

// Claim implements evacuate.Ownership: registry.Begin under the batch's
// transaction (one round trip), held by this node from now on (Node.Hold)
// so that its ownership sync does not abort it before Migrate's ledger
// begins it. A refusal reads the records again (one more round trip).
func (a *evacAdapter) Claim(ctx context.Context, c evacuate.Claim) (evacuate.ClaimResult, error) {
	release := a.d.node.Hold(c.TxID)
	b := registry.Batch{TxID: c.TxID, From: c.Source, To: c.Dest}
	ids := make([]string, 0, len(c.Expect))
	for id, gen := range c.Expect {
		ids = append(ids, id)
		b.VMs = append(b.VMs, registry.VMGen{ID: id, Generation: uint64(gen)})
	}
	slices.Sort(ids)
	slices.SortFunc(b.VMs, func(x, y registry.VMGen) int { return compareStrings(x.ID, y.ID) })
	a.d.evac.add(func(s *EvacuationStats) { s.Claims++; s.ClaimRTT++ })
	vms, err := a.d.reg.Begin(ctx, b)
	if err == nil {
		a.mu.Lock()
		a.holds[c.TxID] = release
		a.mu.Unlock()
		res := evacuate.ClaimResult{OK: true, Records: map[string]evacuate.VMRecord{}}
		for _, vm := range vms {
			res.Records[vm.ID] = vmRecord(vm)
		}
		return res, nil
	}
	release()
	if errors.Is(err, registry.ErrHostNotActive) || errors.Is(err, registry.ErrHostFenced) || errors.Is(err, registry.ErrNotEnrolled) {
		return evacuate.ClaimResult{}, fmt.Errorf("claim to %s: %w: %w", c.Dest, evacuate.ErrHostNotActive, err)
	}
	if !errors.Is(err, registry.ErrBusy) && !errors.Is(err, registry.ErrWrongOwner) && !errors.Is(err, registry.ErrStaleGeneration) && !errors.Is(err, registry.ErrConflict) {
		return evacuate.ClaimResult{}, err
	}
	a.d.evac.add(func(s *EvacuationStats) { s.Conflicts++; s.ClaimRTT++ })
	recs, rerr := a.VMs(ctx, ids)
	if rerr != nil {
		return evacuate.ClaimResult{}, errors.Join(err, rerr)
	}
	return evacuate.ClaimResult{Records: recs}, nil
}

func (a *evacAdapter) unhold(txID string) {
	a.mu.Lock()
	release := a.holds[txID]
	delete(a.holds, txID)
	a.mu.Unlock()
	if release != nil {
		release()
	}
}

// LoadEvacuation implements evacuate.Records.
func (a *evacAdapter) LoadEvacuation(ctx context.Context, source string) ([]byte, int64, error) {
	b, rev, err := a.d.reg.LoadEvacuation(ctx, source)
	if errors.Is(err, registry.ErrNotFound) {
		return nil, 0, fmt.Errorf("%w: %w", evacuate.ErrNotFound, err)
	}
	return b, rev, err
}

// SaveEvacuation implements evacuate.Records.
func (a *evacAdapter) SaveEvacuation(ctx context.Context, source string, data []byte, rev int64) (int64, error) {
	n, err := a.d.reg.SaveEvacuation(ctx, source, data, rev)
	if errors.Is(err, registry.ErrConflict) {
		return 0, fmt.Errorf("%w: %w", evacuate.ErrConflict, err)
	}
	return n, err
}

// SessionAlive implements evacuate.Records.
func (a *evacAdapter) SessionAlive(ctx context.Context, session string) (bool, error) {
	return a.d.reg.SessionAlive(ctx, session)
}

// evacInventory is evacuate.Inventory: the domains of this host whose
// vTPM vtpmd manages: created here ('vtpmctl vm create' made its record),
// holding an active key here (it arrived by migration, with no record),
// or arriving (its key PENDING here for an open incoming transaction).
type evacInventory struct{ a *evacAdapter }

// VMs implements evacuate.Inventory.
func (inv evacInventory) VMs(ctx context.Context) ([]evacuate.VM, error) {
	a := inv.a
	doms, err := a.d.hyp.Domains(ctx)
	if err != nil {
		return nil, err
	}
	// The VMs this host owns: those it holds a usable key for (created
	// here, or arrived by migration, restore or failover, which write no
	// VM record) and those with a VM record ('vm create').
	ours := map[string]string{}
	checks, err := a.d.host.CheckKeys(ctx)
	if err != nil {
		return nil, err
	}
	for id, c := range checks {
		if !c.Damaged {
			ours[id] = ""
		}
	}
	recs, err := a.d.host.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	for _, r := range recs {
		ours[r.UUID] = r.Name
	}
	var out []evacuate.VM
	for _, dom := range doms {
		name, ok := ours[dom.UUID]
		if _, arriving := a.d.node.Incoming(dom.UUID); !ok && !arriving {
			continue
		}
		if dom.Name != "" {
			name = dom.Name
		}
		vm := evacuate.VM{ID: dom.UUID, Name: name, Running: dom.State == hypervisor.StateRunning}
		if vm.Memory, err = a.vmMemory(ctx, dom.UUID); err != nil {
			return nil, fmt.Errorf("memory of %s: %w", dom.UUID, err)
		}
		out = append(out, vm)
	}
	return out, nil
}

// vmMemory is a VM's memory: Deps.VMMemory, else the hypervisor's
// (hypervisor.Capacity: libvirt's domain memory), else 0 (unknown).
func (a *evacAdapter) vmMemory(ctx context.Context, vm string) (uint64, error) {
	if f := a.d.deps.VMMemory; f != nil {
		return f(ctx, vm)
	}
	if c, ok := a.d.hyp.(hypervisor.Capacity); ok {
		return c.DomainMemory(ctx, vm)
	}
	return 0, nil
}

// FreeMemory implements evacuate.Capacity: Deps.FreeMemory, else the
// destination's hypervisor, asked at its migration target
// (hypervisor.Capacity: libvirt's virNodeGetFreeMemory on its libvirtd),
// else unknown (unknownFree: placement balances by count). An error leaves
// the host out of the plan (not-live: its hypervisor did not answer).
func (a *evacAdapter) FreeMemory(ctx context.Context, host string) (uint64, error) {
	if f := a.d.deps.FreeMemory; f != nil {
		return f(ctx, host)
	}
	c, ok := a.d.hyp.(hypervisor.Capacity)
	if !ok {
		return unknownFree, nil
	}
	t, err := a.d.target()(host)
	if err != nil {
		return 0, err
	}
	return c.FreeMemory(ctx, t)
}

// Attest implements evacuate.Mover.
func (a *evacAdapter) Attest(ctx context.Context, dest string) error {
	return a.d.node.Attest(ctx, dest)
}
