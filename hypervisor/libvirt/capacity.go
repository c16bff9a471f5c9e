package libvirt

import (
	"context"
	"errors"
	"fmt"

	golibvirt "libvirt.org/go/libvirt"

	"github.com/vtpmm/vtpmm/hypervisor"
)

var (
	_ hypervisor.Capacity          = (*Hypervisor)(nil)
	_ hypervisor.MigrationProgress = (*Hypervisor)(nil)
)

// FreeMemory reports the free memory of the host at dest: one connection to
// its libvirtd (the URI a migration's prechecks use, Config.PeerURI) and
// virNodeGetFreeMemory.
func (h *Hypervisor) FreeMemory(ctx context.Context, dest hypervisor.Target) (uint64, error) {
	uri := dest.URI
	if h.cfg.PeerURI != nil {
		uri = h.cfg.PeerURI(dest)
	}
	if uri == "" {
		return 0, fmt.Errorf("free memory of %s: %w: target URI required", targetName(dest), ErrBadConfig)
	}
	c, err := connect(ctx, uri)
	if err != nil {
		return 0, fmt.Errorf("free memory of %s: %w", targetName(dest), err)
	}
	defer c.Close()
	free, err := c.GetFreeMemory()
	if err != nil {
		return 0, fmt.Errorf("free memory of %s: %w", targetName(dest), wrapLibvirt(err))
	}
	return free, nil
}

// DomainMemory reports a domain's current memory (virDomainGetInfo, KiB).
func (h *Hypervisor) DomainMemory(ctx context.Context, vmUUID string) (uint64, error) {
	var out uint64
	err := h.with(ctx, func(c *golibvirt.Connect) error {
		d, err := lookup(c, vmUUID)
		if err != nil {
			return err
		}
		defer d.Free()
		info, err := d.GetInfo()
		if err != nil {
			return wrapLibvirt(err)
		}
		out = info.Memory << 10
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("memory of %s on %s: %w", vmUUID, h.cfg.Name, err)
	}
	return out, nil
}

// MigrationBytes reports a running outgoing migration's bytes from the
// domain's job statistics (virDomainGetJobStats: DataProcessed, DataTotal).
func (h *Hypervisor) MigrationBytes(ctx context.Context, vmUUID string) (processed, total uint64, active bool, err error) {
	err = h.with(ctx, func(c *golibvirt.Connect) error {
		d, err := lookup(c, vmUUID)
		if err != nil {
			return err
		}
		defer d.Free()
		j, err := d.GetJobStats(0)
		if isCode(err, golibvirt.ERR_NO_SUPPORT) {
			return nil // a driver without job statistics: no progress to tell
		}
		if err != nil {
			return wrapLibvirt(err)
		}
		active = j.Type != golibvirt.DOMAIN_JOB_NONE && (!j.OperationSet || j.Operation == golibvirt.DOMAIN_JOB_OPERATION_MIGRATION_OUT)
		if active {
			processed, total = j.DataProcessed, j.DataTotal
		}
		return nil
	})
	if errors.Is(err, hypervisor.ErrNoDomain) {
		return 0, 0, false, nil // migrated away (or gone): no job here
	}
	if err != nil {
		return 0, 0, false, fmt.Errorf("migration progress of %s on %s: %w", vmUUID, h.cfg.Name, err)
	}
	return processed, total, active, nil
}
