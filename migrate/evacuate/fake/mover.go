package fake

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/migrate/evacuate"
)

// ErrCrash is what a Mover whose process died returns.
var ErrCrash = errors.New("fake: mover crashed")

// Modelled destination TPM commands (migrate's measured counts):
// unwrapping a batch's transfer key is Import, Load, Unseal and
// FlushContext; fresh evidence adds Certify, Quote and 2 PCR_Read.
const (
	UnwrapCmds = 4
	AttestCmds = 4
)

// Pair is a (source, destination) pair.
type Pair struct{ Source, Dest string }

// Mover is the source host's migration engine as migrate.Node runs it:
// attestation with an evidence cache, one transfer key and one Prepare per
// batch, hypervisor migrations that each hold a slot, and one group commit
// in the registry per batch. Faults are injected through its fields; set
// them before Move runs.
type Mover struct {
	Source   string
	Registry *Client
	World    *World
	Now      func() time.Time
	// EvidenceMaxAge is how long verified evidence is reused (default 60 s).
	EvidenceMaxAge time.Duration

	// FailVM makes the hypervisor migration of a VM fail with the error.
	FailVM map[string]error
	// DropKey makes the destination lack a VM's key after Prepare, so its
	// migration fails as libvirt's does (hypervisor.ErrSecretMissing).
	DropKey map[string]bool
	// CrashAfter makes this process die after that many migrations in all
	// (the last one moved, not committed), when > 0.
	CrashAfter int
	// BeforeMove runs at the start of every Move (e.g. to hold a batch back).
	BeforeMove func(b evacuate.Batch)
	// AfterMigrate runs after every successful migration, with the count so far.
	AfterMigrate func(vm, dest string, n int)

	mu           sync.Mutex
	policy       map[string]*attest.RefusalError
	evidence     map[string]time.Time
	attestations map[Pair]int
	transferKeys map[Pair]int
	dstTPM       map[string]int
	migrations   map[string]int
	incoming     map[string]int
	total        int
	dead         bool
}

var _ evacuate.Mover = (*Mover)(nil)

func (m *Mover) init() {
	if m.policy == nil {
		m.policy, m.evidence = map[string]*attest.RefusalError{}, map[string]time.Time{}
		m.attestations, m.transferKeys = map[Pair]int{}, map[Pair]int{}
		m.dstTPM, m.migrations, m.incoming = map[string]int{}, map[string]int{}, map[string]int{}
	}
}

// Refuse makes dest fail attestation under rule from now on, and drops its
// cached evidence (as a node does when it learns the host rebooted).
func (m *Mover) Refuse(dest string, rule attest.Rule, detail string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.init()
	m.policy[dest] = &attest.RefusalError{Host: dest, Rule: rule, Detail: detail}
	delete(m.evidence, dest)
}

// Attestations returns the attestations (fresh evidence verified) per pair.
func (m *Mover) Attestations() map[Pair]int {
	return m.snapshot(func() map[Pair]int { return m.attestations })
}

// TransferKeys returns the transfer keys made per pair (one per batch).
func (m *Mover) TransferKeys() map[Pair]int {
	return m.snapshot(func() map[Pair]int { return m.transferKeys })
}

func (m *Mover) snapshot(f func() map[Pair]int) map[Pair]int {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.init()
	out := map[Pair]int{}
	for k, v := range f() {
		out[k] = v
	}
	return out
}

// DestTPMCommands returns the modelled TPM commands each destination ran.
func (m *Mover) DestTPMCommands() map[string]int {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.init()
	out := map[string]int{}
	for k, v := range m.dstTPM {
		out[k] = v
	}
	return out
}

// Migrations returns how many times each VM was live-migrated.
func (m *Mover) Migrations() map[string]int {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.init()
	out := map[string]int{}
	for k, v := range m.migrations {
		out[k] = v
	}
	return out
}

func (m *Mover) now() time.Time {
	if m.Now != nil {
		return m.Now()
	}
	return time.Now()
}

// Attest implements evacuate.Mover.
func (m *Mover) Attest(ctx context.Context, dest string) error {
	if m.World.IsDown(dest) {
		return fmt.Errorf("attest %s: %w", dest, evacuate.ErrDestinationDown)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.init()
	if m.dead {
		return ErrCrash
	}
	maxAge := m.EvidenceMaxAge
	if maxAge == 0 {
		maxAge = 60 * time.Second
	}
	if t, ok := m.evidence[dest]; ok && m.now().Sub(t) < maxAge {
		return nil // warm
	}
	m.attestations[Pair{m.Source, dest}]++
	m.dstTPM[dest] += AttestCmds
	if re := m.policy[dest]; re != nil {
		return fmt.Errorf("migrate to %s: destination refused by attestation policy: %w", dest, re)
	}
	m.evidence[dest] = m.now()
	return nil
}

// Move implements evacuate.Mover.
func (m *Mover) Move(ctx context.Context, b evacuate.Batch, slots *evacuate.Slots, progress func(evacuate.Progress)) (evacuate.BatchResult, error) {
	res := evacuate.BatchResult{VMs: map[string]evacuate.VMResult{}}
	if m.BeforeMove != nil {
		m.BeforeMove(b)
	}
	start := m.now()
	rollback := func(err error) (evacuate.BatchResult, error) {
		ids := make([]string, 0, len(b.VMs))
		for _, vm := range b.VMs {
			ids = append(ids, vm.ID)
			res.VMs[vm.ID] = evacuate.VMResult{Outcome: evacuate.OutcomeNotStarted, RunsOn: b.Source, Err: err.Error()}
		}
		if cerr := m.Registry.Commit(context.WithoutCancel(ctx), Commit{TxID: b.TxID, Source: b.Source, Dest: b.Dest, Release: ids}); cerr != nil {
			return evacuate.BatchResult{}, errors.Join(err, cerr) // claims left: recovery's
		}
		return res, err
	}
	for _, vm := range b.VMs {
		progress(evacuate.Progress{VM: vm.ID, Phase: evacuate.PhaseAttest})
	}
	if err := m.Attest(ctx, b.Dest); err != nil {
		if errors.Is(err, ErrCrash) {
			return evacuate.BatchResult{}, err
		}
		return rollback(err)
	}
	m.mu.Lock()
	m.transferKeys[Pair{b.Source, b.Dest}]++
	m.dstTPM[b.Dest] += UnwrapCmds
	m.mu.Unlock()
	for _, vm := range b.VMs {
		progress(evacuate.Progress{VM: vm.ID, Phase: evacuate.PhasePrepare, Elapsed: m.now().Sub(start)})
	}
	if err := m.World.prepare(b.Dest, b.TxID, b.VMs, func(id string) bool { return m.DropKey[id] }); err != nil {
		return rollback(err)
	}

	var wg sync.WaitGroup
	var resMu sync.Mutex
	set := func(id string, r evacuate.VMResult) {
		resMu.Lock()
		res.VMs[id] = r
		resMu.Unlock()
	}
	for _, vm := range b.VMs {
		release, err := slots.Acquire(ctx)
		if err != nil {
			set(vm.ID, evacuate.VMResult{Outcome: evacuate.OutcomeNotStarted, RunsOn: b.Source, Err: err.Error()})
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer release()
			if r, ok := m.migrateOne(b, vm, start, progress); ok {
				set(vm.ID, r)
			}
		}()
	}
	wg.Wait()
	if m.isDead() {
		return evacuate.BatchResult{}, ErrCrash // the process died: nothing is vouched for
	}
	return m.commit(ctx, b, res, start, progress)
}

// migrateOne runs one hypervisor migration; ok is false when the process
// died (the VM's fate is then recovery's).
func (m *Mover) migrateOne(b evacuate.Batch, vm evacuate.BatchVM, start time.Time, progress func(evacuate.Progress)) (evacuate.VMResult, bool) {
	if m.isDead() {
		return evacuate.VMResult{}, false
	}
	const steps = 4
	for i := 1; i < steps; i++ {
		progress(evacuate.Progress{VM: vm.ID, Phase: evacuate.PhaseMigrate, Bytes: vm.Memory * uint64(i) / steps, Total: vm.Memory, Elapsed: m.now().Sub(start)})
	}
	err := m.FailVM[vm.ID]
	if err == nil {
		err = m.World.migrate(vm.ID, b.Source, b.Dest, b.TxID, vm.Generation+1)
	}
	if err != nil {
		return evacuate.VMResult{Outcome: evacuate.OutcomeFailed, RunsOn: b.Source, Err: err.Error(), Elapsed: m.now().Sub(start)}, true
	}
	progress(evacuate.Progress{VM: vm.ID, Phase: evacuate.PhaseMigrate, Bytes: vm.Memory, Total: vm.Memory, Elapsed: m.now().Sub(start)})
	m.mu.Lock()
	m.migrations[vm.ID]++
	m.incoming[b.Dest]++
	m.total++
	n := m.total
	crash := m.CrashAfter > 0 && n == m.CrashAfter
	if crash {
		m.dead = true
	}
	m.mu.Unlock()
	if crash {
		m.Registry.Kill()
		return evacuate.VMResult{}, false
	}
	if m.AfterMigrate != nil {
		m.AfterMigrate(vm.ID, b.Dest, n)
	}
	return evacuate.VMResult{Outcome: evacuate.OutcomeMoved, Generation: vm.Generation + 1, Bytes: vm.Memory, Elapsed: m.now().Sub(start)}, true
}

// commit is the batch's group commit: one registry transaction for every
// VM that moved and every claim to release; then the destination promotes
// its PENDING keys and the source shreds its copies.
func (m *Mover) commit(ctx context.Context, b evacuate.Batch, res evacuate.BatchResult, start time.Time, progress func(evacuate.Progress)) (evacuate.BatchResult, error) {
	moved := map[string]uint64{}
	var release []string
	for _, vm := range b.VMs {
		r := res.VMs[vm.ID]
		if r.Outcome == evacuate.OutcomeMoved {
			moved[vm.ID] = r.Generation
			progress(evacuate.Progress{VM: vm.ID, Phase: evacuate.PhaseCommit, Bytes: r.Bytes, Total: vm.Memory, Elapsed: m.now().Sub(start)})
		} else {
			release = append(release, vm.ID)
		}
	}
	cctx := context.WithoutCancel(ctx) // what moved is committed even after a stop
	err := m.Registry.Commit(cctx, Commit{TxID: b.TxID, Source: b.Source, Dest: b.Dest, Moved: moved, Release: release})
	if err != nil {
		// The VMs that moved run on the destination without its ownership:
		// left open for recovery. Release the rolled-back ones on their own.
		for id := range moved {
			r := res.VMs[id]
			r.Outcome, r.Err = evacuate.OutcomeOpen, fmt.Sprintf("moved, commit refused: %v", err)
			res.VMs[id] = r
		}
		if len(release) > 0 {
			if rerr := m.Registry.Commit(cctx, Commit{TxID: b.TxID, Source: b.Source, Dest: b.Dest, Release: release}); rerr != nil {
				for _, id := range release {
					r := res.VMs[id]
					r.Outcome, r.Err = evacuate.OutcomeOpen, fmt.Sprintf("rolled back, claim not released: %v", rerr)
					res.VMs[id] = r
				}
			}
		}
		moved = nil
	}
	m.World.finish(b.Source, b.Dest, b.TxID, moved, release)
	if m.World.IsDown(b.Dest) {
		return res, fmt.Errorf("batch to %s: %w", b.Dest, evacuate.ErrDestinationDown)
	}
	return res, nil
}

func (m *Mover) isDead() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.dead
}
