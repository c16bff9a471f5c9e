package migrate

import (
	"context"
	"fmt"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/migrate/registry"
)

// RuleDraining refuses a promotion onto a host the operator is draining
// (vtpmctl evacuate, or a drain for maintenance): a failover must not land
// a VM on a host that is being emptied. Neither the automatic failover nor
// the operator's 'vtpmctl failover --to H' promotes there; an operator who
// wants the VM on that host anyway undrains it first ('vtpmctl host
// undrain H'), then fails over, then evacuates again.
const RuleDraining = "draining"

// checkPromoter refuses a promotion onto this host while the registry
// shows it draining (rule draining). One read of this host's record. The
// check and the CAS are two steps: a drain that lands between them is
// caught by the evacuation's final sweep (migrate/evacuate).
func (n *Node) checkPromoter(ctx context.Context, reg FailoverRegistry) error {
	v, err := reg.Hosts(ctx, n.cfg.Host)
	if err != nil {
		return registryError(err)
	}
	if v.Hosts[n.cfg.Host].State == registry.StateDraining {
		return fmt.Errorf("%w: the registry shows this host (%s) draining: a failover never lands a VM on a host being emptied; undrain it first ('vtpmctl host undrain %s') to promote here (rule %s)",
			ErrFailoverRefused, n.cfg.Host, n.cfg.Host, RuleDraining)
	}
	return nil
}

// takeBackFromDrainingFencer is the start rule's answer to a host fenced
// for vm's record by a fencer that is live but draining (checkFenced
// refused, rule fenced): a draining host never promotes (RuleDraining), so
// waiting for it would leave the VM running nowhere until the operator
// undrains it. This host takes the VM back as from a fencer that is gone
// (F11): Reassert, a compare-and-swap on the record revision read, so of
// this and a promotion by a fencer undrained meanwhile exactly one wins.
// It reports whether the VM was taken back; any doubt (a read error, the
// fencer not draining) answers false and the refusal stands.
func (n *Node) takeBackFromDrainingFencer(ctx context.Context, vm string) bool {
	reg, ok := n.cfg.Registry.(FailoverRegistry)
	if !ok {
		return false
	}
	f, frev, err := reg.FenceOf(ctx, n.cfg.Host)
	if err != nil || frev == 0 || f.By == n.cfg.Host {
		return false
	}
	rec, rev, err := reg.VMRev(ctx, vm)
	if err != nil || frev <= rev || rec.Owner != n.cfg.Host {
		return false
	}
	v, err := reg.Hosts(ctx, f.By)
	if err != nil || v.Hosts[f.By].State != registry.StateDraining {
		return false
	}
	if _, err := reg.Reassert(ctx, rec, rev); err != nil {
		n.log.WithError(err).WithField("vm", vm).Warn("fenced by a draining host: taking the VM back failed")
		return false
	}
	n.audit(ctx, AuditEvent{Event: audit.EventRegistryRaised, VM: vm, Peer: f.By, Generation: rec.Generation,
		Detail: "fenced by " + f.By + ", which is draining and never promotes: the record is reasserted (F11)"})
	n.log.WithFields(logrus.Fields{"vm": vm, "fencer": f.By, "generation": rec.Generation}).Warn("fenced, but the fencer is draining (it never promotes): VM taken back")
	return true
}
