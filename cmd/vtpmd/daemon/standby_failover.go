package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/strictjson"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
)

// Failover in the daemon (issue 15, docs/failover.md): a standby whose
// replica's owner lost its lease fences it (the fence agent), promotes
// the replica (migrate.Node.Promote: one CAS; of standbys racing exactly
// one wins), defines the secret and starts the VM through its hypervisor
// (or, with standby.no_start, leaves it to the cloud's HA manager).
// Without quorum nothing is read, fenced or promoted: it waits.

// domainStarter is a hypervisor that can define and start a VM whose
// vTPM state is in place (the fake hypervisor; libvirt starts a domain
// defined from the VM's shared disk by the cloud).
type domainStarter interface {
	StartDomain(ctx context.Context, vmUUID string) error
}

type domainDefiner interface {
	DefineVTPMDomain(ctx context.Context, d hypervisor.Domain, stateDir string) error
}

// tryFailovers promotes the replicas whose owner's lease is gone
// (standby.failover auto), and those whose owner this host fenced for the
// VM's current record, whatever its lease says now (F10: the fence is the
// proof). The fence record is per host: a host fenced to take one VM over
// is fenced for its other VMs too, and waits for this host to promote the
// ones it holds a current replica of (migrate.Node.FencedHere,
// checkFenced). Asking on every pass also covers a fencer that crashed
// and restarted after writing the fence.
func (d *Daemon) tryFailovers(ctx context.Context) {
	d.retryPromotedStarts(ctx)
	if d.cfg.Standby.Failover == "manual" || d.reg.LeaseLost() || d.fenceFunc() == nil {
		return // no fence agent: an operator fences and runs 'vtpmctl failover'
	}
	rs, err := d.node.Replicas()
	if err != nil || len(rs) == 0 {
		return
	}
	hosts, err := d.reg.Hosts(ctx)
	if err != nil || hosts.Hosts[d.cfg.HostID].State == registry.StateDraining { // draining: never a promoter (migrate.RuleDraining)
		return // no quorum: wait (fail closed)
	}
	fencedHere := map[string]bool{} // live owners: fenced by this host (one read each per pass)
	mayPromote := func(owner string) bool {
		if !hosts.Hosts[owner].Live {
			return true
		}
		by, ok := fencedHere[owner]
		if !ok {
			f, frev, err := d.reg.FenceOf(ctx, owner)
			by = err == nil && frev > 0 && f.By == d.cfg.HostID
			fencedHere[owner] = by
		}
		return by
	}
	promoted := false
	for _, r := range rs {
		vm := r.Request.VM
		if _, held := d.holder(vm); held || !mayPromote(r.Request.Owner) {
			continue
		}
		rec, _, err := d.reg.VMRev(ctx, vm)
		if err != nil {
			if errors.Is(err, registry.ErrNotFound) {
				continue
			}
			return
		}
		if rec.Owner == d.cfg.HostID || rec.Generation != r.Request.Generation || !mayPromote(rec.Owner) {
			continue
		}
		if hosts.Hosts[rec.Owner].Live {
			// Live: only this host's fence of this record counts (F11).
			if here, _, err := d.node.FencedHere(ctx, vm); err != nil || !here {
				continue
			}
			d.log.WithFields(logrus.Fields{"vm": vm, "owner": rec.Owner, "generation": rec.Generation}).
				Warn("automatic failover: this host fenced the owner for the VM's record; its lease is back, but the fence counts (F10)")
		}
		rep, err := d.Failover(ctx, adminapi.FailoverRequest{VM: vm, NoStart: d.cfg.Standby.NoStart})
		if err != nil {
			d.log.WithError(err).WithField("vm", vm).Warn("automatic failover did not promote this host")
			continue
		}
		promoted = true
		d.log.WithFields(logrus.Fields{"vm": rep.VM, "from": rep.From, "generation": rep.Generation, "began": rep.Began, "fence": rep.Fence,
			"promote": rep.Promote, "start": rep.Start, "started": rep.Started}).Warn("automatic failover done")
	}
	if promoted {
		// A promotion fenced a host: look again now for its other VMs.
		d.RefreshReplicasNow()
	}
}

// Failover promotes this host's replica of req.VM and starts the VM.
func (d *Daemon) Failover(ctx context.Context, req adminapi.FailoverRequest) (adminapi.FailoverReport, error) {
	rep := adminapi.FailoverReport{VM: req.VM, Host: d.cfg.HostID, Began: d.now()}
	defer func() {
		d.standby.mu.Lock()
		d.standby.last = rep
		d.standby.mu.Unlock()
	}()
	if req.To != "" && req.To != d.cfg.HostID {
		return rep, fmt.Errorf("failover %s: %w: --to %s, but this vtpmd is %s: run it on the standby that takes the VM", req.VM, migrate.ErrBadMessage, req.To, d.cfg.HostID)
	}
	if d.reg == nil {
		return rep, fmt.Errorf("failover %s: %w: failover needs the fleet registry", req.VM, migrate.ErrRefused)
	}
	fm := d.metrics.Failover()
	undefine := d.defineFromReplica(ctx, req.VM) // startPromoted's
	p, err := d.node.Promote(ctx, migrate.PromoteRequest{VM: req.VM, Fence: d.fenceFunc(), ConfirmFenced: req.ConfirmFenced})
	if err != nil {
		if undefine != nil {
			undefine()
		}
		switch {
		case errors.Is(err, registry.ErrConflict), errors.Is(err, registry.ErrWrongOwner), errors.Is(err, registry.ErrStaleGeneration):
			fm.FailoverDone("lost")
		case errors.Is(err, migrate.ErrFailoverRefused):
			fm.FailoverDone("refused")
		default:
			fm.FailoverDone("failed")
		}
		return rep, err
	}
	fm.FailoverDone("promoted")
	fm.ObserveFailover("fence", p.FenceTime)
	fm.ObserveFailover("promote", p.Promote)
	rep.From, rep.Generation, rep.Fenced, rep.Fence, rep.Promote = p.From, p.Generation, p.Fenced, p.FenceTime, p.Promote
	if req.NoStart {
		return rep, nil
	}
	t0 := d.now()
	if err := d.startPromoted(ctx, req.VM, ""); err != nil {
		d.standby.mu.Lock()
		if d.standby.unstarted == nil {
			d.standby.unstarted = map[string]bool{}
		}
		d.standby.unstarted[req.VM] = true // the failover loop retries
		d.standby.mu.Unlock()
		return rep, fmt.Errorf("failover %s: promoted at generation %d, but the start failed (retried by the failover loop): %w", req.VM, p.Generation, err)
	}
	rep.Start, rep.Started = d.now().Sub(t0), true
	fm.ObserveFailover("start", rep.Start)
	return rep, nil
}

// retryPromotedStarts starts again the VMs this vtpmd promoted whose start
// failed (make soak seed 3022: the promoted host lost its registry link
// right after the CAS, so the secret's define refused: self-fence), while
// the registry shows this host the owner with no open migration and the
// VM does not run here. Otherwise the VM stays promoted and defined
// nowhere. The set is in memory: after a restart the cloud's HA manager
// starts it (standby.no_start's case).
func (d *Daemon) retryPromotedStarts(ctx context.Context) {
	if d.reg.LeaseLost() {
		return // self-fenced: the secret's define would refuse
	}
	d.standby.mu.Lock()
	vms := make([]string, 0, len(d.standby.unstarted))
	for vm := range d.standby.unstarted {
		vms = append(vms, vm)
	}
	d.standby.mu.Unlock()
	done := func(vm string) {
		d.standby.mu.Lock()
		delete(d.standby.unstarted, vm)
		d.standby.mu.Unlock()
	}
	for _, vm := range vms {
		rec, _, err := d.reg.VMRev(ctx, vm)
		switch {
		case errors.Is(err, registry.ErrNotFound):
			done(vm)
			continue
		case err != nil:
			return // no quorum: later
		case rec.Owner != d.cfg.HostID:
			done(vm) // it moved on (another failover, a migration)
			continue
		case rec.Tx != nil:
			continue
		}
		if dom, err := d.hyp.Domain(ctx, vm); err == nil && dom.State == hypervisor.StateRunning {
			done(vm)
			continue
		}
		if err := d.startPromoted(ctx, vm, ""); err != nil {
			d.log.WithError(err).WithField("vm", vm).Warn("failover: the promoted VM's start failed again; retrying")
			continue
		}
		done(vm)
		d.log.WithFields(logrus.Fields{"vm": vm, "generation": rec.Generation}).Warn("failover: the promoted VM started on a retry")
	}
}

// LastFailover is the last failover this daemon ran (tests, measures).
func (d *Daemon) LastFailover() adminapi.FailoverReport {
	d.standby.mu.Lock()
	defer d.standby.mu.Unlock()
	return d.standby.last
}

// Crash stops the daemon as a crash or power loss would for the fleet:
// its liveness lease is left to expire instead of being revoked (the
// in-process fleet's Host.Crash).
func (d *Daemon) Crash(ctx context.Context) error {
	if d.reg != nil {
		d.reg.Abandon()
	}
	return d.Close(ctx)
}

// startPromoted defines the VM's secret (the start rule agrees now) and
// starts it through the hypervisor, defining the domain on the state put
// in place when the hypervisor does not know it. (On libvirt, Failover
// defined it before the promotion from the owner's description sent with
// the replica, when there was one: defineFromReplica.)
func (d *Daemon) startPromoted(ctx context.Context, vm, name string) error {
	starter, ok := d.hyp.(domainStarter)
	if !ok {
		return fmt.Errorf("this host's hypervisor cannot start VMs from vtpmd: the cloud's HA manager starts %s (standby.no_start)", vm)
	}
	if _, err := d.node.DefineSecret(ctx, vm); err != nil {
		return err
	}
	dom, err := d.hyp.Domain(ctx, vm)
	if err != nil {
		return err
	}
	if dom.State == hypervisor.StateAbsent {
		def, ok := d.hyp.(domainDefiner)
		if !ok {
			return fmt.Errorf("the domain of %s is not defined here", vm)
		}
		if name == "" {
			if r, err := d.host.FindVM(vm); err == nil && r.Name != "" {
				name = r.Name
			} else {
				name = vm
			}
		}
		if err := def.DefineVTPMDomain(ctx, hypervisor.Domain{UUID: vm, Name: name}, d.host.Layout().VMState(vm)); err != nil {
			return err
		}
	}
	if dom.State == hypervisor.StateRunning {
		return nil
	}
	return starter.StartDomain(ctx, vm)
}

// fenceFunc is the configured fence agent (Deps.Fence in tests), or nil.
func (d *Daemon) fenceFunc() migrate.FenceFunc {
	if d.deps.Fence != nil {
		return d.deps.Fence
	}
	argv := d.cfg.Standby.Fence.Command
	if len(argv) == 0 {
		return nil
	}
	timeout, _ := d.cfg.Standby.fenceTimeout()
	return func(ctx context.Context, host string) error {
		args := make([]string, len(argv))
		for i, a := range argv {
			args[i] = strings.ReplaceAll(a, "{host}", host)
		}
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		t0 := time.Now()
		cmd := exec.CommandContext(ctx, args[0], args[1:]...)
		// On timeout the agent's whole process group is killed, and Wait
		// returns even if a child still holds its output open.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
		cmd.WaitDelay = time.Second
		out, err := cmd.CombinedOutput()
		log := d.log.WithFields(logrus.Fields{"fence": args, "host": host, "took": time.Since(t0).Round(time.Millisecond)})
		if err != nil {
			log.WithError(err).WithField("output", string(out)).Error("fence agent failed: the host is not fenced")
			return fmt.Errorf("fence agent %s: %w: %s", args[0], err, strings.TrimSpace(string(out)))
		}
		log.Warn("fence agent: host fenced")
		return nil
	}
}

// ---- admin API ----

func (d *Daemon) handleFailover(w http.ResponseWriter, r *http.Request) {
	var req adminapi.FailoverRequest
	if err := strictjson.DecodeReader(r.Body, &req, maxAdminRequest); err != nil || req.VM == "" {
		adminapi.WriteError(w, http.StatusBadRequest, fmt.Errorf("want {\"vm\": \"VM\", \"to\": \"HOST\", \"confirm_fenced\": [...]}"))
		return
	}
	id, err := d.resolveVM(r.Context(), req.VM)
	if err != nil {
		adminapi.WriteError(w, http.StatusNotFound, err)
		return
	}
	req.VM = id
	rep, err := d.Failover(r.Context(), req)
	if err != nil {
		adminapi.WriteError(w, http.StatusForbidden, err)
		return
	}
	adminapi.WriteJSON(w, http.StatusOK, rep)
}

func (d *Daemon) handleStandby(w http.ResponseWriter, r *http.Request) {
	var req adminapi.StandbyRequest
	if err := strictjson.DecodeReader(r.Body, &req, maxAdminRequest); err != nil || req.VM == "" {
		adminapi.WriteError(w, http.StatusBadRequest, fmt.Errorf("want {\"vm\": \"VM\", \"on\": [...], \"off\": [...]}"))
		return
	}
	set, err := d.SetStandbys(r.Context(), req)
	if err != nil {
		adminapi.WriteError(w, http.StatusBadRequest, err)
		return
	}
	adminapi.WriteJSON(w, http.StatusOK, set)
}

// SetStandbys assigns and removes a VM's standbys in the registry; the
// owner's next refresh sends the new ones their replica.
func (d *Daemon) SetStandbys(ctx context.Context, req adminapi.StandbyRequest) (adminapi.StandbySet, error) {
	if d.reg == nil {
		return adminapi.StandbySet{}, fmt.Errorf("standby: %w: standbys need the fleet registry", migrate.ErrRefused)
	}
	id, err := d.resolveVM(ctx, req.VM)
	if err != nil {
		return adminapi.StandbySet{}, err
	}
	v, err := d.reg.VMs(ctx, id)
	if err != nil {
		return adminapi.StandbySet{}, err
	}
	rec, ok := v.VMs[id]
	if !ok {
		return adminapi.StandbySet{}, fmt.Errorf("standby %s: %w", id, registry.ErrNotFound)
	}
	for _, h := range req.On {
		if h == rec.Owner {
			return adminapi.StandbySet{}, fmt.Errorf("standby %s: %w: %s is the VM's owner", id, migrate.ErrBadMessage, h)
		}
		if err := d.reg.AssignStandby(ctx, id, h); err != nil {
			return adminapi.StandbySet{}, err
		}
	}
	for _, h := range req.Off {
		if err := d.reg.DropStandby(ctx, id, h); err != nil {
			return adminapi.StandbySet{}, err
		}
	}
	d.RefreshReplicasNow()
	sbs, err := d.standbyInfos(ctx, id, rec)
	return adminapi.StandbySet{VM: id, Owner: rec.Owner, Generation: rec.Generation, Standbys: sbs}, err
}

// standbyInfos lists a VM's standbys with their replica's age.
func (d *Daemon) standbyInfos(ctx context.Context, vm string, rec registry.VM) ([]adminapi.StandbyInfo, error) {
	sbs, err := d.reg.Standbys(ctx, vm)
	if err != nil {
		return nil, err
	}
	out := make([]adminapi.StandbyInfo, 0, len(sbs))
	for _, s := range sbs {
		out = append(out, adminapi.StandbyInfo{Host: s.Host, Generation: s.Generation, Updated: s.Updated,
			Age: d.now().Sub(s.Updated).Round(time.Millisecond), Current: s.Generation != 0 && s.Generation == rec.Generation})
	}
	slices.SortFunc(out, func(a, b adminapi.StandbyInfo) int { return strings.Compare(a.Host, b.Host) })
	return out, nil
}

// addStandbyInfo adds the VM's standbys and this host's replica to info
// (vtpmctl vm show).
func (d *Daemon) addStandbyInfo(ctx context.Context, info *adminapi.VMInfo) {
	if d.reg == nil {
		return
	}
	if v, err := d.reg.VMs(ctx, info.UUID); err == nil {
		if rec, ok := v.VMs[info.UUID]; ok {
			info.Standbys, _ = d.standbyInfos(ctx, info.UUID, rec)
		}
	}
	rs, _ := d.node.Replicas()
	for _, r := range rs {
		if r.Request.VM == info.UUID {
			info.Replica = &adminapi.StandbyInfo{Host: d.cfg.HostID, Generation: r.Request.Generation, Updated: r.Received,
				Age: d.now().Sub(r.Received).Round(time.Millisecond)}
		}
	}
}
