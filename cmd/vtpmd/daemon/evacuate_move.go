package daemon

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/evacuate"
	"github.com/vtpmm/vtpmm/migrate/registry"
)

// Move implements evacuate.Mover: one Node.Migrate of the batch under its
// claimed transaction, its hypervisor migrations holding the evacuation's
// slots. Migrate runs without the run's cancellation (a stop starts no new
// migration, through the slots, but lets those in flight commit); each
// VM's outcome is read back from the ledger.
func (a *evacAdapter) Move(ctx context.Context, b evacuate.Batch, slots *evacuate.Slots, progress func(evacuate.Progress)) (evacuate.BatchResult, error) {
	defer a.unhold(b.TxID)
	d := a.d
	d.evac.add(func(s *EvacuationStats) { s.Batches++ })
	start := time.Now()
	ids := make([]string, len(b.VMs))
	gens := map[string]uint64{}
	for i, vm := range b.VMs {
		ids[i], gens[vm.ID] = vm.ID, vm.Generation
	}
	all := func(p evacuate.Phase) {
		for _, id := range ids {
			progress(evacuate.Progress{VM: id, Phase: p, Elapsed: time.Since(start)})
		}
	}
	var mu sync.Mutex
	started := map[string]time.Time{}
	took := map[string]time.Duration{}
	watching := map[string]*bytesWatch{}
	req := migrate.Request{VMs: ids, Dest: b.Dest, TxID: b.TxID, Claimed: true, Slots: slots,
		OnVM: func(ev migrate.VMEvent) {
			mu.Lock()
			if ev.Started {
				started[ev.VM] = time.Now()
			}
			if ev.Done && ev.Err == nil {
				took[ev.VM] = ev.Elapsed
			}
			w := watching[ev.VM]
			mu.Unlock()
			switch {
			case ev.Started:
				d.evac.add(func(s *EvacuationStats) { s.Migrations++ })
				progress(evacuate.Progress{VM: ev.VM, Phase: evacuate.PhaseMigrate, Elapsed: time.Since(start)})
				w = d.watchBytes(ctx, ev.VM, func(done, total uint64) {
					progress(evacuate.Progress{VM: ev.VM, Phase: evacuate.PhaseMigrate, Bytes: done, Total: total, Elapsed: time.Since(start)})
				})
				mu.Lock()
				watching[ev.VM] = w
				mu.Unlock()
			case ev.Done:
				done, total := w.stop()
				if ev.Err == nil {
					progress(evacuate.Progress{VM: ev.VM, Phase: evacuate.PhaseCommit, Bytes: done, Total: total, Elapsed: time.Since(start)})
				}
			}
		}}
	res, err := d.node.Migrate(context.WithoutCancel(ctx), req, func(p migrate.Phase, _ string) {
		switch p {
		case migrate.PhaseAttest:
			all(evacuate.PhaseAttest)
		case migrate.PhasePrepare:
			all(evacuate.PhasePrepare)
		}
	})
	if res != nil {
		d.evac.add(func(s *EvacuationStats) { s.CommitRTT += res.Registry.RoundTrips })
	}
	out := evacuate.BatchResult{VMs: map[string]evacuate.VMResult{}}
	tx, lerr := d.ledger.Get(b.TxID)
	// Left open: the destination did not confirm the end (it died or
	// stopped answering; a live one confirms an abort at once, and a
	// registry outage fails the commit before it is asked). Settle it now,
	// by recovery's rules (the VMs that still run here are aborted, in the
	// registry first), so that they can be re-planned onto other hosts in
	// this run; those that moved (or might have) stay open.
	destGone := false
	if lerr == nil && !tx.State.Final() {
		tx, destGone = d.recoverBatch(ctx, tx)
	}
	mu.Lock()
	defer mu.Unlock()
	switch {
	case lerr != nil:
		// The ledger never began it (the source refused before: a key it
		// does not hold, ...): close the claim; nothing left this host.
		rb := registry.Batch{TxID: b.TxID, From: b.Source, To: b.Dest}
		for _, id := range ids {
			rb.VMs = append(rb.VMs, registry.VMGen{ID: id, Generation: gens[id]})
			out.VMs[id] = evacuate.VMResult{Outcome: evacuate.OutcomeNotStarted, RunsOn: b.Source, Err: errText(err)}
		}
		if _, aerr := d.reg.Abort(context.WithoutCancel(ctx), rb); aerr != nil {
			d.log.WithError(aerr).WithField("tx", b.TxID).Warn("closing an evacuation claim the ledger never began; the ownership sync retries")
		}
	case tx.State.Final():
		for _, vm := range tx.VMs {
			r := evacuate.VMResult{Elapsed: took[vm.UUID]}
			if w := watching[vm.UUID]; w != nil {
				r.Bytes, _ = w.last()
			}
			_, began := started[vm.UUID]
			switch {
			case vm.Outcome == migrate.OutcomeMigrated && tx.State == migrate.SrcCommitted:
				r.Outcome, r.Generation = evacuate.OutcomeMoved, vm.Generation
			case began:
				r.Outcome, r.RunsOn, r.Err = evacuate.OutcomeFailed, b.Source, vm.Error
			default:
				r.Outcome, r.RunsOn, r.Err = evacuate.OutcomeNotStarted, b.Source, tx.Reason
			}
			out.VMs[vm.UUID] = r
		}
	default:
		// Open: the commit (or an abort the destination did not confirm)
		// is left to recovery, which settles it by the hypervisor's evidence.
		for _, vm := range tx.VMs {
			out.VMs[vm.UUID] = evacuate.VMResult{Outcome: evacuate.OutcomeOpen, Err: fmt.Sprintf("transaction %s is %s: %s", tx.ID, tx.State, errText(err))}
		}
	}
	if err == nil {
		return out, nil
	}
	if re := (*attest.RefusalError)(nil); errors.As(err, &re) {
		return out, err
	}
	if destGone || errors.Is(err, migrate.ErrPeer) {
		return out, fmt.Errorf("%w: %w", evacuate.ErrDestinationDown, err)
	}
	return out, err
}

// Bounds of recoverBatch: a destination that is going away may still
// answer a Status while its vtpmd shuts down, and refuse the Finish.
const (
	batchRecoverWait = 10 * time.Second
	batchRecoverPoll = 500 * time.Millisecond
)

// recoverBatch settles a batch's transaction that Migrate left open
// (Node.Recover: this run still holds it), retrying for a few seconds. It
// returns the transaction as the ledger holds it now, and whether recovery
// closed it with VMs that did not move (the destination never confirmed
// the end; they were aborted, and their destination is down for this run).
func (d *Daemon) recoverBatch(ctx context.Context, tx migrate.Tx) (migrate.Tx, bool) {
	// Not the run's cancellation (a stop lets the batch settle), but the
	// daemon's: a vtpmd shutting down does not wait for it.
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	defer context.AfterFunc(d.bgCtx, cancel)()
	deadline := time.Now().Add(batchRecoverWait)
	for {
		cur, err := d.node.Recover(rctx, tx.ID)
		if err == nil && cur.State.Final() {
			if cur.State == migrate.SrcCommitted && !slices.ContainsFunc(cur.VMs, func(vm migrate.TxVM) bool { return vm.Outcome != migrate.OutcomeMigrated }) {
				return cur, false // every VM moved: the destination just answered late
			}
			d.log.WithField("tx", tx.ID).WithField("dest", tx.Peer).Warn("evacuation: the destination did not confirm its batch; recovery settled it")
			return cur, true
		}
		if cur.ID != "" {
			tx = cur
		}
		if !time.Now().Before(deadline) {
			d.log.WithError(err).WithField("tx", tx.ID).Warn("evacuation: the batch's transaction stays open for recovery")
			return tx, false
		}
		select {
		case <-time.After(batchRecoverPoll):
		case <-rctx.Done():
			return tx, false
		}
	}
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// bytesPoll is how often a migration's bytes are read from the hypervisor
// (libvirt's job statistics) for the progress lines.
const bytesPoll = 250 * time.Millisecond

// bytesWatch polls one VM's outgoing migration for its bytes
// (hypervisor.MigrationProgress) until stopped. A nil *bytesWatch (the
// hypervisor cannot tell) reports nothing.
type bytesWatch struct {
	mu          sync.Mutex
	done, total uint64
	stopped     chan struct{}
	finished    chan struct{}
}

// watchBytes starts polling vm's migration, calling report whenever its
// bytes change; nil when the hypervisor reports no progress.
func (d *Daemon) watchBytes(ctx context.Context, vm string, report func(done, total uint64)) *bytesWatch {
	mp, ok := d.hyp.(hypervisor.MigrationProgress)
	if !ok {
		return nil
	}
	w := &bytesWatch{stopped: make(chan struct{}), finished: make(chan struct{})}
	pctx := context.WithoutCancel(ctx)
	go func() {
		defer close(w.finished)
		t := time.NewTicker(bytesPoll)
		defer t.Stop()
		for {
			select {
			case <-w.stopped:
				return
			case <-t.C:
			}
			done, total, active, err := mp.MigrationBytes(pctx, vm)
			if err != nil || !active {
				continue
			}
			w.mu.Lock()
			changed := done != w.done || total != w.total
			w.done, w.total = done, total
			w.mu.Unlock()
			if changed {
				report(done, total)
			}
		}
	}()
	return w
}

// stop ends the polling and returns the last bytes read.
func (w *bytesWatch) stop() (done, total uint64) {
	if w == nil {
		return 0, 0
	}
	select {
	case <-w.stopped:
	default:
		close(w.stopped)
	}
	<-w.finished
	return w.last()
}

// last returns the last bytes read.
func (w *bytesWatch) last() (done, total uint64) {
	if w == nil {
		return 0, 0
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.done, w.total
}
