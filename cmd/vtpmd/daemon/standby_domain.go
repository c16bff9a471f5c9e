package daemon

import (
	"context"

	"github.com/vtpmm/vtpmm/hypervisor"
)

// A standby where the VM's domain is not defined (libvirt) defines it at a
// failover from the description its owner sent with the replica
// (migrate.ReplicaRequest.DomainXML; docs/failover.md).

// domainXMLDefiner is a hypervisor that defines a domain from its owner's
// description (hypervisor/libvirt).
type domainXMLDefiner interface {
	DefineDomainXML(ctx context.Context, vmUUID, doc string) error
	UndefineDomain(ctx context.Context, vmUUID string, removeTPMState bool) error
}

// defineFromReplica defines the VM's domain from the description in this
// host's replica when the hypervisor does not know it. It runs before the
// promotion, so that the promoted state is put where the hypervisor's
// vTPM reads it (vmStateDir asks the defined domain). It returns an undo
// for a promotion that did not take (nil when it defined nothing).
func (d *Daemon) defineFromReplica(ctx context.Context, vm string) (undo func()) {
	def, ok := d.hyp.(domainXMLDefiner)
	if !ok {
		return nil
	}
	if dom, err := d.hyp.Domain(ctx, vm); err != nil || dom.State != hypervisor.StateAbsent {
		return nil
	}
	rs, err := d.node.Replicas()
	if err != nil {
		return nil
	}
	for _, r := range rs {
		if r.Request.VM != vm || r.Request.DomainXML == "" {
			continue
		}
		log := d.log.WithField("vm", vm)
		if err := def.DefineDomainXML(ctx, vm, r.Request.DomainXML); err != nil {
			log.WithError(err).Warn("failover: the domain was not defined from its owner's description")
			return nil
		}
		log.WithField("from", r.Request.Owner).Info("failover: domain defined from its owner's description")
		return func() {
			if err := def.UndefineDomain(ctx, vm, false); err != nil {
				log.WithError(err).Warn("failover: the domain defined for a promotion that did not take stays defined")
			}
		}
	}
	return nil
}
