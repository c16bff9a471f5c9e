package libvirt

import (
	"context"
	"errors"
	"fmt"
	"time"

	golibvirt "libvirt.org/go/libvirt"

	"github.com/vtpmm/vtpmm/hypervisor"
)

// JobStats is the progress of a domain's current (or last completed) job.
type JobStats struct {
	Active        bool          // a job is running (or, for CompletedJobStats, one completed)
	Elapsed       time.Duration // time since the job started
	Downtime      time.Duration // guest pause time (migrations; completed jobs)
	DataTotal     uint64        // bytes to transfer
	DataProcessed uint64        // bytes transferred
	DataRemaining uint64        // bytes left
	MemIteration  uint64        // pre-copy iteration
}

// CompletedJobStats reports the domain's last completed job; on a
// migration's destination it gives the migration's time and downtime.
func (h *Hypervisor) CompletedJobStats(ctx context.Context, vmUUID string) (JobStats, error) {
	return h.jobStats(ctx, vmUUID, golibvirt.DOMAIN_JOB_STATS_COMPLETED)
}

func (h *Hypervisor) jobStats(ctx context.Context, vmUUID string, flags golibvirt.DomainGetJobStatsFlags) (JobStats, error) {
	var out JobStats
	err := h.with(ctx, func(c *golibvirt.Connect) error {
		d, err := lookup(c, vmUUID)
		if err != nil {
			return err
		}
		defer d.Free()
		j, err := d.GetJobStats(flags)
		if err != nil {
			return wrapLibvirt(err)
		}
		out = JobStats{
			Active:        j.Type != golibvirt.DOMAIN_JOB_NONE,
			Elapsed:       time.Duration(j.TimeElapsed) * time.Millisecond,
			Downtime:      time.Duration(j.Downtime) * time.Millisecond,
			DataTotal:     j.DataTotal,
			DataProcessed: j.DataProcessed,
			DataRemaining: j.DataRemaining,
			MemIteration:  j.MemIteration,
		}
		return nil
	})
	if err != nil {
		return JobStats{}, fmt.Errorf("job stats of %s on %s: %w", vmUUID, h.cfg.Name, err)
	}
	return out, nil
}

// MigratingOut reports whether the domain's current job is an outgoing
// migration (migrate.MigrationJobs): hook mode releases a VM's key only
// while its owner's libvirt migrates it away. An absent domain is not
// migrating.
func (h *Hypervisor) MigratingOut(ctx context.Context, vmUUID string) (bool, error) {
	out := false
	err := h.with(ctx, func(c *golibvirt.Connect) error {
		d, err := lookup(c, vmUUID)
		if err != nil {
			return err
		}
		defer d.Free()
		j, err := d.GetJobStats(0)
		if err != nil {
			return wrapLibvirt(err)
		}
		out = j.Type != golibvirt.DOMAIN_JOB_NONE && j.OperationSet && j.Operation == golibvirt.DOMAIN_JOB_OPERATION_MIGRATION_OUT
		return nil
	})
	if errors.Is(err, hypervisor.ErrNoDomain) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("job of %s on %s: %w", vmUUID, h.cfg.Name, err)
	}
	return out, nil
}
