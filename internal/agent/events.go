package agent

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/migrate"
)

// lifecycleWatcher is a hypervisor that reports domain lifecycle events
// (libvirt.Hypervisor).
type lifecycleWatcher interface {
	WatchLifecycle(ctx context.Context, fn func(libvirt.LifecycleEvent)) error
}

// settlesOn reports whether a lifecycle event may end a migration whose
// driver is gone: the VM stopped here (for any reason, "migrated"
// included), or arrived here by migration.
func settlesOn(e libvirt.LifecycleEvent) bool {
	switch e.Event {
	case "stopped":
		return true
	case "resumed", "started":
		return e.Detail == "migrated"
	}
	return false
}

// watchLifecycle settles a VM's open transaction promptly when libvirt
// reports that it left, arrived or stopped: a third trigger besides hook
// mode's "release end" and the recovery loop, which stay as they are.
// Settle leaves transactions alone that a live driver or a pull lease owns.
func (d *Daemon) watchLifecycle(ctx context.Context, w lifecycleWatcher) error {
	// VM UUID -> struct{}: a settle is scheduled and has not started yet.
	// libvirt sends started/migrated and resumed/migrated a few ms apart.
	var pending sync.Map
	return w.WatchLifecycle(ctx, func(e libvirt.LifecycleEvent) {
		log := d.log.WithFields(logrus.Fields{"vm": e.VM, "name": e.Name, "event": e.Event, "detail": e.Detail})
		if !settlesOn(e) {
			log.Debug("lifecycle event")
			return
		}
		if _, busy := pending.LoadOrStore(e.VM, struct{}{}); busy {
			log.Debug("lifecycle event: a settle is scheduled already")
			return
		}
		log.Debug("lifecycle event: settling the VM's transaction")
		d.settleOnEvent(e.VM, func() { pending.Delete(e.VM) })
	})
}

// settleOnEvent is settle for lifecycle events; done runs when the delay
// is over (or the daemon stops). ErrUnresolved is expected here and logged
// at debug level: on the destination the live source still drives the
// transaction; recovery retries. (On the source in hook mode, "release end"
// settles at the same moment; the loser of that race finds the transaction
// finished and logs it.)
func (d *Daemon) settleOnEvent(vmUUID string, done func()) {
	d.bg.Add(1)
	go func() {
		defer d.bg.Done()
		select {
		case <-d.bgCtx.Done():
			done()
			return
		case <-time.After(settleDelay):
		}
		done() // an event from now on schedules another settle
		ctx, cancel := context.WithTimeout(d.bgCtx, HookTimeout)
		defer cancel()
		log := d.log.WithField("vm", vmUUID)
		switch err := d.node.Settle(ctx, vmUUID); {
		case errors.Is(err, migrate.ErrUnresolved):
			log.WithError(err).Debug("lifecycle event: transaction still open; recovery retries")
		case err != nil:
			log.WithError(err).Warn("lifecycle event: settling the VM's transaction; recovery retries")
		}
	}()
}
