package daemon

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/errclass"
	"github.com/vtpmm/vtpmm/internal/strictjson"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/vtpm/host"
)

// The admin API's fleet part: the registry's view (hosts, VMs), VM
// creation recorded in the registry, and enrolment checks whose record
// the operator writes to the registry.

// errNoRegistry means the request needs a fleet registry and vtpmd runs
// in registry mode none.
var errNoRegistry = errors.New("vtpmd runs without a fleet registry (registry mode none)")

func (d *Daemon) handleRegistry(w http.ResponseWriter, r *http.Request) {
	rc := d.cfg.RegistryConfig()
	info := adminapi.RegistryInfo{Mode: string(rc.Mode), Host: d.cfg.HostID}
	if d.reg != nil {
		info.Endpoints, info.CAFile = d.cfg.RegistryEndpoints(), rc.CAFile
		info.Prefix = rc.Prefix
		if info.Prefix == "" {
			info.Prefix = registry.DefaultPrefix
		}
		info.Live, info.RoundTrips, info.ViewRev = d.reg.Live(), d.reg.RoundTrips(), d.reg.Cached().Rev
	}
	adminapi.WriteJSON(w, http.StatusOK, info)
}

// FleetVMs lists the registry's VM records (the last view, marked stale,
// when the registry has no quorum).
func (d *Daemon) FleetVMs(ctx context.Context) (adminapi.FleetVMs, error) {
	if d.reg == nil {
		return adminapi.FleetVMs{}, errNoRegistry
	}
	out := adminapi.FleetVMs{VMs: []adminapi.FleetVM{}}
	v, err := d.reg.VMs(ctx)
	if err != nil {
		if !errors.Is(err, registry.ErrNoQuorum) {
			return out, err
		}
		v, out.Stale, out.Error = d.reg.Cached(), true, err.Error()
	}
	out.Rev = v.Rev
	hosts, _ := d.fleet.get(ctx, fleetViewMiss)
	names := d.localNames(ctx)
	for _, vm := range v.VMs {
		f := adminapi.FleetVM{UUID: vm.ID, Name: names[vm.ID], Owner: vm.Owner, Generation: vm.Generation}
		if vm.Tx != nil {
			f.TxID, f.TxTo = vm.Tx.ID, vm.Tx.To
		}
		if h, ok := hosts.Hosts[vm.Owner]; ok {
			f.OwnerState, f.OwnerLive = string(h.State), h.Live
		}
		out.VMs = append(out.VMs, f)
	}
	sort.Slice(out.VMs, func(i, j int) bool { return out.VMs[i].Name+out.VMs[i].UUID < out.VMs[j].Name+out.VMs[j].UUID })
	return out, nil
}

// localNames maps the VMs this host knows (records, domains) to names.
func (d *Daemon) localNames(ctx context.Context) map[string]string {
	out := map[string]string{}
	recs, _ := d.host.ListVMs(ctx)
	for _, r := range recs {
		out[r.UUID] = r.Name
	}
	doms, _ := d.hyp.Domains(ctx)
	for _, dom := range doms {
		if dom.Name != "" {
			out[dom.UUID] = dom.Name
		}
	}
	return out
}

func (d *Daemon) handleFleetVMs(w http.ResponseWriter, r *http.Request) {
	vms, err := d.FleetVMs(r.Context())
	switch {
	case errors.Is(err, errNoRegistry):
		adminapi.WriteError(w, http.StatusNotFound, err)
	case err != nil:
		adminapi.WriteError(w, http.StatusServiceUnavailable, err)
	default:
		adminapi.WriteJSON(w, http.StatusOK, vms)
	}
}

// registryHosts lists every host the registry knows.
func (d *Daemon) registryHosts(ctx context.Context) ([]adminapi.HostInfo, error) {
	v, err := d.fleet.get(ctx, 0)
	if err != nil {
		return nil, err
	}
	out := make([]adminapi.HostInfo, 0, len(v.Hosts)+1)
	if _, ok := v.Hosts[d.cfg.HostID]; !ok {
		v.Hosts[d.cfg.HostID] = registry.HostView{Name: d.cfg.HostID}
	}
	for name, h := range v.Hosts {
		hi := adminapi.HostInfo{Host: name, Self: name == d.cfg.HostID, State: string(h.State), Live: h.Live,
			Registered: h.Host != nil, Enrolled: h.Enrolment != nil, Reachable: h.Live}
		if h.Host != nil {
			hi.Address = h.Host.Addr
		}
		if e := h.Enrolment; e != nil {
			hi.EnrolledBy, hi.EnrolledAt, hi.EK, hi.AK = e.By, e.At, e.Identity.EK, e.Identity.AK
			hi.Method = e.Method
			if hi.Method == "" {
				hi.Method = registry.MethodActivation
			}
			if h.Host != nil && (h.Host.Identity.EK != e.Identity.EK || h.Host.Identity.AK != e.Identity.AK) {
				hi.Error = "the TPM identity it registered differs from its enrolment"
			}
		}
		out = append(out, hi)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Host < out[j].Host })
	return out, nil
}

// enrollForRegistry runs the enrolment check of host and returns the
// verified record without recording it: the operator writes it to the
// registry with its own credentials.
func (d *Daemon) enrollForRegistry(ctx context.Context, host string) (*migrate.EnrollResult, error) {
	if d.node == nil || d.enroll == nil {
		return nil, fmt.Errorf("enroll %s: %w: this host has no attestation policy configured", host, migrate.ErrRefused)
	}
	capture := &captureEnrollment{}
	return d.node.Enroll(ctx, host, capture)
}

func enrollInfo(host string, res *migrate.EnrollResult, inRegistry bool) adminapi.EnrollInfo {
	info := adminapi.EnrollInfo{Host: host, EKChain: res.EKChain, EKDigest: hex.EncodeToString(res.EKDigest),
		AKName: hex.EncodeToString(res.AKName), Method: res.Record.Method, EnrolledAt: res.Record.EnrolledAt,
		Registry: inRegistry, Code: errclass.CodeOK}
	if info.Method == "" {
		info.Method = registry.MethodActivation
	}
	if len(res.Record.AKCertDigest) > 0 {
		info.AKCertDigest = hex.EncodeToString(res.Record.AKCertDigest)
	}
	return info
}

// CreateVM creates a VM's vTPM on this host: its key and encrypted swtpm
// state (vtpm/host), its record in the fleet registry at generation 1
// (undone if the registry refuses: the UUID is another host's, or the
// registry has no quorum), and the hypervisor's secret, so that the
// hypervisor can start it.
func (d *Daemon) CreateVM(ctx context.Context, name, uuid string) (host.VM, error) {
	var opts host.CreateOptions
	if d.reg != nil {
		opts.Record = func(ctx context.Context, id string) error {
			_, err := d.reg.CreateVM(ctx, id, d.cfg.HostID)
			if errors.Is(err, registry.ErrExists) {
				// This host's ownership sync may have recorded the new key
				// first (it raises what the registry does not know): that
				// record is this creation's.
				if v, rerr := d.reg.VMs(ctx, id); rerr == nil {
					if r, ok := v.VMs[id]; ok && r.Owner == d.cfg.HostID && r.Generation == 1 && r.Tx == nil {
						err = nil
					}
				}
			}
			if err != nil {
				return fmt.Errorf("record it in the fleet registry: %w", err)
			}
			return nil
		}
	}
	vm, err := d.host.CreateVMWith(ctx, name, uuid, opts)
	if err != nil {
		return host.VM{}, err
	}
	if !hypervisor.IsNone(d.hyp) {
		if _, err := d.node.DefineSecret(ctx, vm.UUID); err != nil {
			return vm, fmt.Errorf("create VM %s: %w", name, err)
		}
	}
	return vm, nil
}

func (d *Daemon) handleCreateVM(w http.ResponseWriter, r *http.Request) {
	var req adminapi.CreateVMRequest
	if err := strictjson.DecodeReader(r.Body, &req, maxAdminRequest); err != nil || req.Name == "" {
		adminapi.WriteError(w, http.StatusBadRequest, fmt.Errorf("want {\"name\": \"NAME\", \"uuid\": \"optional UUID\"}"))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Minute)
	defer cancel()
	vm, err := d.CreateVM(ctx, req.Name, req.UUID)
	if err != nil {
		status := http.StatusInternalServerError
		if errors.Is(err, host.ErrVMExists) || errors.Is(err, registry.ErrExists) {
			status = http.StatusConflict
		} else if errors.Is(err, host.ErrConfig) {
			status = http.StatusBadRequest
		}
		adminapi.WriteError(w, status, err)
		return
	}
	info := adminapi.VMInfo{Name: vm.Name, UUID: vm.UUID, Owned: true, Generation: 1, State: string(hypervisor.StateAbsent)}
	adminapi.WriteJSON(w, http.StatusCreated, info)
}

// StartVMs starts the vTPM of every VM this host has a record and a key
// for, when the daemon runs them itself (no hypervisor): each start goes
// through the start rule first (migrate.Node.CheckStart: with a fleet
// registry, a VM whose record disagrees is refused, and why). It returns
// the started VMs and the refusals; it fails only when the VMs cannot be
// listed or a vTPM fails to start.
func (d *Daemon) StartVMs(ctx context.Context) ([]host.VMStatus, map[string]error, error) {
	vms, err := d.host.ListVMs(ctx)
	if err != nil {
		return nil, nil, err
	}
	refused := map[string]error{}
	var started []host.VMStatus
	for _, vm := range vms {
		if _, err := d.node.CheckStart(ctx, vm.UUID); err != nil {
			refused[vm.Name] = err
			continue
		}
		st, err := d.host.StartVM(ctx, vm.UUID)
		if err != nil {
			return started, refused, err
		}
		started = append(started, st)
	}
	if len(refused) > 0 {
		d.requestSync()
	}
	return started, refused, nil
}
