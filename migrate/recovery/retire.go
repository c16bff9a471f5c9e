package recovery

import (
	"context"
	"fmt"
	"sort"

	"github.com/vtpmm/vtpmm/migrate/registry"
)

// RetireReport is what a retirement did and what is left to restore.
type RetireReport struct {
	Host    string
	Already bool // the host was fenced before
	// VMs are the VMs the registry shows owned by the host: each must be
	// restored from its newest bundle onto another host.
	VMs []registry.VM
}

// Retire marks a dead host fenced in the registry for good (the state
// 'vtpmctl host fence' sets): it never becomes the owner of a VM again,
// Begin and Commit towards it are refused, and its VMs may be restored
// elsewhere without --force. A host that is still live is refused unless
// force (a live host runs its VMs: fence it only if it is untrusted).
func Retire(ctx context.Context, reg *registry.Client, host string, force bool) (RetireReport, error) {
	rep := RetireReport{Host: host}
	hv, err := reg.Hosts(ctx, host)
	if err != nil {
		return rep, fmt.Errorf("retire %s: %w", host, err)
	}
	h, ok := hv.Hosts[host]
	if !ok || h.Enrolment == nil {
		return rep, fmt.Errorf("retire %s: %w (rule enrolled)", host, registry.ErrNotEnrolled)
	}
	if h.Live && !force {
		return rep, fmt.Errorf("retire %s: %w: it holds its liveness lease, so its vtpmd runs (rule owner-not-live); stop it, or fence it with --force if it is untrusted", host, registry.ErrHostLive)
	}
	rep.Already = h.State == registry.StateFenced
	if !rep.Already {
		if err := reg.SetState(ctx, host, registry.StateFenced); err != nil {
			return rep, fmt.Errorf("retire %s: %w", host, err)
		}
	}
	v, err := reg.VMs(ctx)
	if err != nil {
		return rep, fmt.Errorf("retire %s: the VMs it owned: %w", host, err)
	}
	for _, vm := range v.VMs {
		if vm.Owner == host {
			rep.VMs = append(rep.VMs, vm)
		}
	}
	sort.Slice(rep.VMs, func(i, j int) bool { return rep.VMs[i].ID < rep.VMs[j].ID })
	return rep, nil
}
