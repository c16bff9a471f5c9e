package migrate

import (
	"context"
	"fmt"

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
