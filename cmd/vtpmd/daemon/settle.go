package daemon

import (
	"context"
	"errors"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate"
)

// settlesOn reports whether a lifecycle event may end a migration whose
// driver is gone: the VM stopped here (for any reason, "migrated"
// included), or arrived here by migration.
func settlesOn(e hypervisor.LifecycleEvent) bool {
	switch e.Event {
	case hypervisor.EventStopped:
		return true
	case hypervisor.EventResumed, hypervisor.EventStarted:
		return e.Detail == hypervisor.DetailMigrated
	}
	return false
}

// watchLifecycle settles a VM's open transaction promptly when libvirt
// reports that it left, arrived or stopped: a third trigger besides hook
// mode's "release end" and the recovery loop, which stay as they are.
// Settle leaves transactions alone that a live driver or a pull lease owns.
func (d *Daemon) watchLifecycle(ctx context.Context, w hypervisor.LifecycleWatcher) error {
	return w.WatchLifecycle(ctx, func(e hypervisor.LifecycleEvent) {
		log := d.log.WithFields(logrus.Fields{"vm": e.VM, "name": e.Name, "event": e.Event, "detail": e.Detail})
		if e.Event == hypervisor.EventStopped && e.Detail != hypervisor.DetailMigrated {
			d.rotateStopped(e.VM)
		}
		if !settlesOn(e) {
			log.Debug("lifecycle event")
			return
		}
		log.Debug("lifecycle event: settling the VM's transaction")
		d.settle(e.VM, "lifecycle event")
	})
}

// Settling: three triggers finish a VM's open transaction once its driver
// is gone (a hook-mode migration, a crash): hook mode's "release end", the
// hypervisor's lifecycle events, and the recovery loop. They share the
// node's recovery lock (one recovery at a time).

// settle reconciles the VM's open transaction soon, in the background:
// after settleDelay (a hook must have returned, and libvirt released the
// domain, first). Triggers that come while a settle of the VM is scheduled
// join it: libvirt sends started/migrated and resumed/migrated a few ms
// apart, and in hook mode "release end" and stopped/migrated arrive
// together. ErrUnresolved is expected (on the destination the live source
// still drives the transaction) and logged at debug level; recovery
// retries either way.
func (d *Daemon) settle(vmUUID, trigger string) {
	if _, busy := d.settling.LoadOrStore(vmUUID, struct{}{}); busy {
		return
	}
	d.bg.Add(1)
	go func() {
		defer d.bg.Done()
		select {
		case <-d.bgCtx.Done():
			d.settling.Delete(vmUUID)
			return
		case <-time.After(settleDelay):
		}
		d.settling.Delete(vmUUID) // a trigger from now on schedules another settle
		ctx, cancel := context.WithTimeout(d.bgCtx, adminapi.HookTimeout)
		defer cancel()
		log := d.log.WithFields(logrus.Fields{"vm": vmUUID, "trigger": trigger})
		switch err := d.node.Settle(ctx, vmUUID); {
		case errors.Is(err, migrate.ErrUnresolved):
			log.WithError(err).Debug("settle: transaction still open; recovery retries")
		case err != nil:
			log.WithError(err).Warn("settle: the VM's transaction stays open; recovery retries")
		}
	}()
}

// RecoveryInterval is the period of the recovery loop.
const RecoveryInterval = 15 * time.Second

// recoveryLoop retries Reconcile while transactions stay open, and moves
// the keys of VMs whose domains are on another host (migrate.Reunite).
func (d *Daemon) recoveryLoop(ctx context.Context) error {
	t := time.NewTicker(RecoveryInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if open, _ := d.ledger.OpenTxs(); len(open) > 0 {
				if err := d.node.Reconcile(ctx); err != nil {
					d.log.WithError(err).Warn("recovery: transactions still open")
				}
			}
			d.reunite(ctx)
		}
	}
}

// reunite runs migrate.Reunite (one ledger read when no VM is apart).
func (d *Daemon) reunite(ctx context.Context) {
	if _, err := d.node.Reunite(ctx); err != nil {
		d.log.WithError(err).Warn("reunite: a VM's key stays apart from its domain; retrying")
	}
}
