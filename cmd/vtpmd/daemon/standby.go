package daemon

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
)

// Standby replicas in the daemon (issue 15, docs/failover.md). As an
// owner, vtpmd refreshes every standby of every VM it owns whenever the
// VM's state or generation changed (at most standby.max_lag behind: the
// loop runs every max_lag/3), places standbys automatically up to
// standby.count, and drops a standby that fails attestation. As a
// standby, it drops replicas whose standby record is gone, and watches
// the owners' liveness for failover (standby_failover.go).

// StandbyConfig is the standby section of vtpmd's configuration.
type StandbyConfig struct {
	// Count is the fleet default of standbys per VM, placed automatically
	// on enrolled, active, live hosts that pass attestation (0: only the
	// standbys the operator assigns with 'vtpmctl vm standby').
	Count int `yaml:"count"`
	// MaxLag bounds how far a replica lags behind the VM's state (Go
	// duration, default 30s).
	MaxLag string `yaml:"max_lag"`
	// Failover: "auto" (the default: a standby promotes when the owner's
	// lease is gone and the fence agent fenced it) or "manual" (only
	// 'vtpmctl failover').
	Failover string `yaml:"failover"`
	// NoStart leaves a promoted VM defined but not started: the cloud's
	// HA manager starts it.
	NoStart bool `yaml:"no_start"`
	// Fence is the fence agent, run for the old owner before a failover.
	Fence FenceConfig `yaml:"fence"`
}

// FenceConfig is a fence agent command (Pacemaker's convention: exit 0
// means the host is fenced, i.e. powered off).
type FenceConfig struct {
	// Command is the argv; "{host}" in any argument is replaced by the
	// host to fence, e.g. ["/usr/sbin/fence_lab", "--host", "{host}"].
	// Empty: no fence agent; a failover waits for an operator's
	// 'vtpmctl failover VM --to HOST --confirm-fenced OLD'.
	Command []string `yaml:"command"`
	// Timeout bounds one run (default 30s).
	Timeout string `yaml:"timeout"`
}

// Defaults of the standby section.
const (
	DefaultStandbyMaxLag = 30 * time.Second
	DefaultFenceTimeout  = 30 * time.Second
)

func (c StandbyConfig) maxLag() (time.Duration, error) {
	if c.MaxLag == "" {
		return DefaultStandbyMaxLag, nil
	}
	d, err := time.ParseDuration(c.MaxLag)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("%w: standby.max_lag %q is not a duration > 0 (e.g. 30s)", ErrConfig, c.MaxLag)
	}
	return d, nil
}

func (c StandbyConfig) fenceTimeout() (time.Duration, error) {
	if c.Fence.Timeout == "" {
		return DefaultFenceTimeout, nil
	}
	d, err := time.ParseDuration(c.Fence.Timeout)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("%w: standby.fence.timeout %q is not a duration > 0", ErrConfig, c.Fence.Timeout)
	}
	return d, nil
}

func (c StandbyConfig) validate() error {
	if c.Count < 0 || c.Count > 8 {
		return fmt.Errorf("%w: standby.count %d (0..8)", ErrConfig, c.Count)
	}
	if _, err := c.maxLag(); err != nil {
		return err
	}
	if _, err := c.fenceTimeout(); err != nil {
		return err
	}
	switch c.Failover {
	case "", "auto", "manual":
	default:
		return fmt.Errorf("%w: standby.failover %q (auto or manual)", ErrConfig, c.Failover)
	}
	if len(c.Fence.Command) > 0 && c.Fence.Command[0] == "" {
		return fmt.Errorf("%w: standby.fence.command: empty program", ErrConfig)
	}
	return nil
}

// replicaKey names one (VM, standby) pair.
type replicaKey struct{ vm, host string }

// replicaSent is what the owner last sent a standby.
type replicaSent struct {
	gen     uint64
	sum     [32]byte
	at      time.Time
	changed time.Time // when the state first differed from what was sent (zero: current)
}

// standbyState is the owner's memory of its refreshes.
type standbyState struct {
	mu      sync.Mutex
	sent    map[replicaKey]replicaSent
	refused map[string]time.Time // standby -> when its attestation was refused
	now     chan struct{}        // asks for a refresh now
	last    adminapi.FailoverReport
	// unstarted are VMs this vtpmd promoted whose start failed: the
	// failover loop retries the start (retryPromotedStarts).
	unstarted map[string]bool
}

// refusedFor is how long automatic placement avoids a host whose
// attestation was refused.
const refusedFor = 10 * time.Minute

// standbyLoop refreshes replicas (owner), drops replicas whose record is
// gone (standby), and tries failovers (standby), every max_lag/3 and on
// liveness changes.
func (d *Daemon) standbyLoop(ctx context.Context) error {
	lag, _ := d.cfg.Standby.maxLag()
	tick := max(lag/3, 100*time.Millisecond)
	t := time.NewTicker(tick)
	defer t.Stop()
	live := d.reg.WatchLiveness(ctx, 0)
	for {
		d.refreshReplicas(ctx)
		d.checkReplicas(ctx)
		d.tryFailovers(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-d.standby.now:
		case ev, ok := <-live:
			if !ok || ev.Err != nil {
				live = d.reg.WatchLiveness(ctx, 0) // resumed (after quorum returns)
				select {
				case <-ctx.Done():
					return nil
				case <-t.C:
				}
			}
		}
	}
}

// RefreshReplicasNow asks the standby loop for a refresh now (after a
// migration, rekey or restore; tests).
func (d *Daemon) RefreshReplicasNow() {
	select {
	case d.standby.now <- struct{}{}:
	default:
	}
}

// refreshReplicas sends a replica to every standby of every VM this host
// owns whose copy is not current.
func (d *Daemon) refreshReplicas(ctx context.Context) {
	if d.reg.LeaseLost() {
		return // self-fenced: no key leaves this host
	}
	infos, err := d.host.Keys().List(ctx)
	if err != nil {
		d.log.WithError(err).Warn("standby refresh: list keys")
		return
	}
	var hosts *registry.HostsView
	for _, k := range infos {
		if ctx.Err() != nil {
			return
		}
		rec, ok := d.reg.Cached(k.VMID).VMs[k.VMID]
		if !ok || rec.Owner != d.cfg.HostID || rec.Generation != k.Generation || rec.Tx != nil {
			continue
		}
		sbs, err := d.reg.Standbys(ctx, k.VMID)
		if err != nil {
			continue
		}
		if n := d.cfg.Standby.Count - len(sbs); n > 0 {
			if hosts == nil {
				if v, err := d.reg.Hosts(ctx); err == nil {
					hosts = &v
				}
			}
			sbs = append(sbs, d.placeStandbys(ctx, k.VMID, sbs, hosts, n)...)
		}
		for _, sb := range sbs {
			if sb.Host == d.cfg.HostID {
				_ = d.reg.DropStandby(ctx, k.VMID, sb.Host) // the owner is no standby of its own VM
				continue
			}
			d.refreshOne(ctx, k.VMID, k.Generation, sb)
		}
	}
}

// placeStandbys assigns up to n standbys: enrolled, active, live hosts
// other than this one, not already standbys, not refused recently;
// fewest replicas first is not tracked: by name.
func (d *Daemon) placeStandbys(ctx context.Context, vm string, have []registry.Standby, hosts *registry.HostsView, n int) []registry.Standby {
	if hosts == nil {
		return nil
	}
	var names []string
	for name := range hosts.Hosts {
		names = append(names, name)
	}
	sort.Strings(names)
	var out []registry.Standby
	for _, name := range names {
		h := hosts.Hosts[name]
		if len(out) >= n {
			break
		}
		if name == d.cfg.HostID || h.Enrolment == nil || h.State != registry.StateActive || !h.Live ||
			slices.ContainsFunc(have, func(s registry.Standby) bool { return s.Host == name }) {
			continue
		}
		d.standby.mu.Lock()
		at, refused := d.standby.refused[name]
		d.standby.mu.Unlock()
		if refused && d.now().Sub(at) < refusedFor {
			continue
		}
		if err := d.reg.AssignStandby(ctx, vm, name); err != nil {
			continue
		}
		d.log.WithFields(logrus.Fields{"vm": vm, "standby": name}).Info("standby placed")
		out = append(out, registry.Standby{VM: vm, Host: name})
	}
	return out
}

// refreshOne sends sb a replica if its copy is not current.
func (d *Daemon) refreshOne(ctx context.Context, vm string, gen uint64, sb registry.Standby) {
	state, err := d.readState(ctx, vm)
	if err != nil {
		return
	}
	sum := sha256.Sum256(state)
	key := replicaKey{vm, sb.Host}
	d.standby.mu.Lock()
	last, ok := d.standby.sent[key]
	d.standby.mu.Unlock()
	if ok && last.gen == gen && last.sum == sum && sb.Generation == gen {
		d.metrics.Failover().SetLag(vm, sb.Host, 0)
		return
	}
	if ok && last.changed.IsZero() {
		last.changed = d.now()
	}
	tpm0 := d.host.Meter().Stats().Total
	stats, err := d.node.SendReplica(ctx, vm, d.vmName(ctx, vm), sb.Host, state)
	tpm := d.host.Meter().Stats().Total - tpm0
	log := d.log.WithFields(logrus.Fields{"vm": vm, "standby": sb.Host, "generation": gen})
	switch {
	case errors.Is(err, migrate.ErrRefused):
		d.metrics.Failover().Refreshed("refused")
		d.standby.mu.Lock()
		d.standby.refused[sb.Host] = d.now()
		delete(d.standby.sent, key)
		d.standby.mu.Unlock()
		if derr := d.reg.DropStandby(ctx, vm, sb.Host); derr != nil {
			log.WithError(derr).Warn("dropping a standby that failed attestation")
		}
		log.WithError(err).Warn("standby refused by attestation: dropped (it holds no replica from this host)")
		return
	case err != nil:
		d.metrics.Failover().Refreshed("failed")
		if ok && !last.changed.IsZero() {
			d.metrics.Failover().SetLag(vm, sb.Host, d.now().Sub(last.changed))
			d.standby.mu.Lock()
			d.standby.sent[key] = last
			d.standby.mu.Unlock()
		}
		log.WithError(err).Debug("standby refresh failed; retrying")
		return
	}
	d.metrics.Failover().Refreshed("sent")
	d.metrics.Failover().SetLag(vm, sb.Host, 0)
	d.standby.mu.Lock()
	d.standby.sent[key] = replicaSent{gen: gen, sum: sum, at: d.now()}
	d.standby.mu.Unlock()
	log.WithFields(logrus.Fields{"bytes": stats.Bytes, "warm": stats.Warm, "tpm_commands": tpm}).Debug("standby replica refreshed")
}

// checkReplicas drops this host's replicas whose standby record is gone
// (the operator removed the standby, or its owner dropped it after a
// refused attestation) or whose VM is gone from the registry.
func (d *Daemon) checkReplicas(ctx context.Context) {
	rs, err := d.node.Replicas()
	if err != nil || len(rs) == 0 {
		return
	}
	for _, r := range rs {
		if _, held := d.holder(r.Request.VM); held {
			continue // a promotion runs
		}
		sbs, err := d.reg.Standbys(ctx, r.Request.VM)
		if err != nil {
			continue // no quorum: keep it
		}
		if !slices.ContainsFunc(sbs, func(s registry.Standby) bool { return s.Host == d.cfg.HostID }) {
			if err := d.node.DropReplica(ctx, r.Request.VM, "this host is no longer a standby of the VM (its standby record is gone)"); err != nil {
				d.log.WithError(err).WithField("vm", r.Request.VM).Warn("dropping a replica")
			}
		}
	}
}
