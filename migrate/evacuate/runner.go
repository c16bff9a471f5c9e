package evacuate

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
)

// Defaults of Config.
const (
	DefaultSettleTimeout = 60 * time.Second
	DefaultPollInterval  = time.Second
	// DefaultHeadroom is what the CLI keeps free on every destination
	// (Nova's reserved_host_memory_mb default is 512 MiB as well).
	DefaultHeadroom uint64 = 512 << 20
	// finalWriteTimeout bounds the record write after a stop.
	finalWriteTimeout = 10 * time.Second
)

// Config is everything an Evacuator needs; nothing is global.
type Config struct {
	Source    string // the host being evacuated
	Fleet     Fleet
	Ownership Ownership
	Records   Records
	Inventory Inventory // the source's hypervisor
	Capacity  Capacity  // the destinations' hypervisors
	Mover     Mover
	// Session is this process's registry session; the record names it, so
	// that a later run can tell a crashed holder from a live one.
	Session string
	// HolderID names this process in the record (e.g. "vtpmd@host-a").
	HolderID string
	Events   Sink
	Log      logrus.FieldLogger
	Now      func() time.Time
	// Sleep waits d or until ctx ends (tests advance a fake clock).
	Sleep func(ctx context.Context, d time.Duration) error
	Rand  io.Reader // transaction IDs
	// SettleTimeout bounds the wait for a VM's open transaction to be
	// settled by recovery before the VM is reported open.
	SettleTimeout time.Duration
	PollInterval  time.Duration // between reads while waiting
}

// Options are the operator's (vtpmctl evacuate flags).
type Options struct {
	To       []string // --to: only these destinations
	Parallel int      // --parallel: migrations at once (DefaultParallel when 0)
	Headroom uint64   // bytes kept free on each destination
	DryRun   bool     // --dry-run: plan (attesting the destinations), move nothing, write nothing
}

// Evacuator evacuates one source host.
type Evacuator struct {
	cfg Config
	log logrus.FieldLogger
}

// New checks cfg and fills in defaults.
func New(cfg Config) (*Evacuator, error) {
	switch {
	case cfg.Source == "":
		return nil, fmt.Errorf("evacuate: %w: no source host", ErrBadInput)
	case cfg.Fleet == nil || cfg.Ownership == nil || cfg.Records == nil || cfg.Inventory == nil || cfg.Capacity == nil || cfg.Mover == nil:
		return nil, fmt.Errorf("evacuate: %w: registry, inventory, capacity and mover are all required", ErrBadInput)
	case cfg.Session == "":
		return nil, fmt.Errorf("evacuate: %w: no registry session", ErrBadInput)
	}
	if cfg.HolderID == "" {
		cfg.HolderID = "evacuate@" + cfg.Source
	}
	if cfg.Events == nil {
		cfg.Events = SinkFunc(func(Event) {})
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Sleep == nil {
		cfg.Sleep = sleep
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	if cfg.SettleTimeout <= 0 {
		cfg.SettleTimeout = DefaultSettleTimeout
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	log := cfg.Log
	if log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		log = l
	}
	return &Evacuator{cfg: cfg, log: log.WithField("evacuate", cfg.Source)}, nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Run evacuates the source: it claims the evacuation record, marks the
// source draining, plans (attesting every destination it plans for and
// re-planning around refusals), then runs one batch per destination, each
// VM committed as its batch commits. Cancelling ctx stops it gracefully:
// no new migration starts, those in flight finish and commit, and the
// record says where it stopped, so that running it again continues there.
// The report is returned whenever planning got that far, with an error
// only when the evacuation could not run as a whole.
func (e *Evacuator) Run(ctx context.Context, opts Options) (*Report, error) {
	start := e.cfg.Now()
	hosts, err := e.cfg.Fleet.Hosts(ctx)
	if err != nil {
		return nil, fmt.Errorf("evacuate %s: hosts: %w", e.cfg.Source, err)
	}
	i := slices.IndexFunc(hosts, func(h Host) bool { return h.Name == e.cfg.Source })
	switch {
	case i < 0:
		return nil, fmt.Errorf("evacuate %s: %w", e.cfg.Source, ErrUnknownHost)
	case hosts[i].State == HostFenced:
		return nil, fmt.Errorf("evacuate %s: %w: its VMs are taken over by failover", e.cfg.Source, ErrSourceFenced)
	}
	if opts.Parallel <= 0 {
		opts.Parallel = DefaultParallel
	}
	opts.To = slices.Compact(slices.Sorted(slices.Values(opts.To)))
	r := &run{e: e, opts: opts, start: start, slots: NewSlots(opts.Parallel),
		recs: map[string]VMRecord{}, vms: map[string]VM{}, assign: map[string]string{},
		results: map[string]VMReport{}, excluded: map[string]Exclusion{}, names: map[string]string{},
		prior: map[string]string{}, planned: map[string]string{}, cause: map[string]ExcludedHost{}}
	r.report = &Report{Source: e.cfg.Source, DryRun: opts.DryRun}
	var prior *Record
	if opts.DryRun {
		prior, _ = e.peek(ctx)
	} else {
		if prior, err = r.acquire(ctx); err != nil {
			return nil, err
		}
		// From here on the record is ours: whatever happens, say where we stopped.
		defer r.release(ctx)
		if err := e.cfg.Fleet.Drain(ctx, e.cfg.Source); err != nil {
			r.fatal = err
			return nil, fmt.Errorf("evacuate %s: mark draining: %w", e.cfg.Source, err)
		}
	}
	if err := r.inventory(ctx, hosts, prior); err != nil {
		r.fatal = err
		return nil, err
	}
	if err := r.planAndAttest(ctx); err != nil {
		r.fatal = err
		return nil, err
	}
	r.emit(Event{Type: EventPlan, Plan: r.plan, DryRun: opts.DryRun, Resumed: r.report.Resumed})
	if opts.DryRun {
		return r.finishDryRun(), nil
	}
	if err := r.saveRecord(ctx, StateRunning); err != nil {
		r.fatal = err
		return nil, err
	}
	stopWatch := context.AfterFunc(ctx, r.slots.Stop)
	defer stopWatch()
	r.mu.Lock()
	for _, b := range r.plan.Batches() {
		r.spawn(ctx, b)
	}
	r.mu.Unlock()
	r.wg.Wait()
	r.sweep(ctx) // VMs that arrived during the run (a failover onto the draining source)
	rep := r.finish(ctx)
	if r.lost {
		return rep, fmt.Errorf("evacuate %s: %w: another evacuator took the record over; this run stopped", e.cfg.Source, ErrBusy)
	}
	return rep, nil
}

// peek reads the record for a dry run: a resumed plan keeps its destinations.
func (e *Evacuator) peek(ctx context.Context) (*Record, error) {
	b, _, err := e.cfg.Records.LoadEvacuation(ctx, e.cfg.Source)
	if err != nil {
		return nil, err
	}
	return DecodeRecord(b)
}

// acquire takes the evacuation record: created if there is none, taken
// over if it is finished or its holder's registry session died, refused
// (ErrBusy) while its holder's session is alive. Every write is a
// compare-and-swap on the revision read, so of two evacuators starting at
// once one wins and the other, re-reading, finds it alive.
func (r *run) acquire(ctx context.Context) (*Record, error) {
	e := r.e
	for attempt := 0; attempt < 3; attempt++ {
		data, rev, err := e.cfg.Records.LoadEvacuation(ctx, e.cfg.Source)
		var prior *Record
		switch {
		case errors.Is(err, ErrNotFound):
			rev = 0
		case err != nil:
			return nil, fmt.Errorf("evacuate %s: load record: %w", e.cfg.Source, err)
		default:
			if prior, err = DecodeRecord(data); err != nil {
				return nil, fmt.Errorf("evacuate %s: %w", e.cfg.Source, err)
			}
		}
		if prior != nil && prior.State == StateRunning {
			alive, err := e.cfg.Records.SessionAlive(ctx, prior.Holder.Session)
			if err != nil {
				return nil, fmt.Errorf("evacuate %s: holder session: %w", e.cfg.Source, err)
			}
			if alive {
				return nil, fmt.Errorf("evacuate %s: %w: held by %s since %s (its registry session %s is alive)",
					e.cfg.Source, ErrBusy, prior.Holder.ID, prior.Updated.Format(time.RFC3339), prior.Holder.Session)
			}
			e.log.WithField("holder", prior.Holder.ID).Warn("taking over an evacuation whose holder died")
		}
		now := e.cfg.Now()
		rec := &Record{Version: RecordVersion, Source: e.cfg.Source, State: StateRunning, Started: now, Updated: now, Runs: 1,
			Holder:  &Holder{ID: e.cfg.HolderID, Session: e.cfg.Session},
			Options: RecordOptions{To: r.opts.To, Parallel: r.opts.Parallel, Headroom: r.opts.Headroom}}
		resumed := prior != nil && prior.State != StateDone
		if resumed {
			rec.Started, rec.Runs, rec.Plan = prior.Started, prior.Runs+1, prior.Plan
		}
		b, err := EncodeRecord(rec)
		if err != nil {
			return nil, err
		}
		newRev, err := e.cfg.Records.SaveEvacuation(ctx, e.cfg.Source, b, rev)
		if errors.Is(err, ErrConflict) {
			continue // someone wrote it meanwhile: read again
		}
		if err != nil {
			return nil, fmt.Errorf("evacuate %s: save record: %w", e.cfg.Source, err)
		}
		r.rec, r.rev = rec, newRev
		r.report.Resumed, r.report.Run = resumed, rec.Runs
		if !resumed {
			prior = nil
		}
		return prior, nil
	}
	return nil, fmt.Errorf("evacuate %s: %w: the record kept changing", e.cfg.Source, ErrBusy)
}

// saveRecord writes the record with the current plan and state (CAS).
func (r *run) saveRecord(ctx context.Context, state RecordState) error {
	r.recMu.Lock()
	defer r.recMu.Unlock()
	if r.lost {
		return fmt.Errorf("evacuate %s: %w: the record was taken over", r.e.cfg.Source, ErrBusy)
	}
	r.mu.Lock()
	rec := *r.rec
	rec.State, rec.Updated = state, r.e.cfg.Now()
	if r.plan != nil { // before planning, keep the plan the record had
		rec.Plan = r.currentPlan()
	}
	rec.Excluded = r.exclusions()
	if state != StateRunning {
		rec.Holder = nil
		rec.Outcomes = r.outcomes()
	}
	r.mu.Unlock()
	b, err := EncodeRecord(&rec)
	if err != nil {
		return err
	}
	rev, err := r.e.cfg.Records.SaveEvacuation(ctx, r.e.cfg.Source, b, r.rev)
	if errors.Is(err, ErrConflict) {
		r.lost = true
		r.slots.Stop()
		return fmt.Errorf("evacuate %s: %w: the record was taken over", r.e.cfg.Source, ErrBusy)
	}
	if err != nil {
		return fmt.Errorf("evacuate %s: save record: %w", r.e.cfg.Source, err)
	}
	r.rec, r.rev = &rec, rev
	return nil
}

// release writes the final state, even after ctx ended.
func (r *run) release(ctx context.Context) {
	if r.released {
		return
	}
	r.released = true
	state := StateIncomplete
	switch {
	case r.fatal == nil:
		state = r.finalState()
	case errors.Is(r.fatal, ErrStopped) || errors.Is(r.fatal, context.Canceled):
		state = StateInterrupted
	}
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finalWriteTimeout)
	defer cancel()
	if err := r.saveRecord(wctx, state); err != nil {
		r.e.log.WithError(err).Error("could not write the evacuation record at the end of the run")
		return
	}
	r.report.State = state
}

type run struct {
	e     *Evacuator
	opts  Options
	start time.Time
	slots *Slots
	wg    sync.WaitGroup

	emitMu sync.Mutex

	recMu    sync.Mutex // record writes, one at a time
	rec      *Record
	rev      int64
	lost     bool
	released bool
	fatal    error

	mu       sync.Mutex
	hosts    []Candidate             // the snapshot plans are made from
	names    map[string]string       // VM -> name, for events
	prior    map[string]string       // VM -> destination in the record of an earlier run
	planned  map[string]string       // VM -> destination as planned now (the record's plan)
	cause    map[string]ExcludedHost // VM -> the host left out that displaced it
	vms      map[string]VM           // in scope: running on the source, owned by it
	recs     map[string]VMRecord     // latest known registry records
	assign   map[string]string       // VM -> current destination
	results  map[string]VMReport     // final per VM in this run
	excluded map[string]Exclusion
	plan     *Plan
	report   *Report
}

func (r *run) emit(ev Event) {
	ev.V, ev.Source = EventSchema, r.e.cfg.Source
	if ev.Time.IsZero() {
		ev.Time = r.e.cfg.Now()
	}
	r.emitMu.Lock()
	defer r.emitMu.Unlock()
	r.e.cfg.Events.Event(ev)
}

func (r *run) newTxID() (string, error) {
	b := make([]byte, 16)
	if _, err := io.ReadFull(r.e.cfg.Rand, b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}
