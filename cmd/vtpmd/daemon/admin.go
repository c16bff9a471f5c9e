package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"sort"
	"time"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/internal/errclass"
	"github.com/vtpmm/vtpmm/internal/strictjson"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/host"
)

// The admin API (internal/adminapi) is vtpmctl's local access to vtpmd:
// JSON over HTTP on a unix socket that only root can open (mode 0600).
// Migrations stream their progress as JSON lines.

// adminServer is the admin API's HTTP server.
func (d *Daemon) adminServer() *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+adminapi.PathMigrate, d.handleMigrate)
	mux.HandleFunc("POST "+adminapi.PathEvacuate, d.handleEvacuate)
	mux.HandleFunc("POST "+adminapi.PathEvacuateStop, d.handleEvacuateStop)
	mux.HandleFunc("GET "+adminapi.PathVMs, d.handleVMs)
	mux.HandleFunc("POST "+adminapi.PathVMs, d.handleCreateVM)
	mux.HandleFunc("GET "+adminapi.PathFleetVMs, d.handleFleetVMs)
	mux.HandleFunc("GET "+adminapi.PathRegistry, d.handleRegistry)
	mux.HandleFunc("GET "+adminapi.PathVMs+"/{ref}", d.handleVM)
	mux.HandleFunc("POST "+adminapi.PathVMs+"/{ref}/rekey", d.handleRekey)
	mux.HandleFunc("GET "+adminapi.PathHosts, d.handleHosts)
	mux.HandleFunc("POST "+adminapi.PathHosts+"/{host}/enroll", d.handleEnroll)
	mux.HandleFunc("GET "+adminapi.PathAudit, d.handleAudit)
	mux.HandleFunc("POST "+adminapi.PathHookPull, d.handleHookPull)
	mux.HandleFunc("POST "+adminapi.PathHookPrepare, d.handleHookPrepare)
	mux.HandleFunc("POST "+adminapi.PathHookReleased, d.handleHookReleased)
	mux.HandleFunc("POST "+adminapi.PathBackup, d.handleBackup)
	mux.HandleFunc("POST "+adminapi.PathRestoreAttest, d.handleRestoreAttest)
	mux.HandleFunc("POST "+adminapi.PathRestorePrepare, d.handleRestorePrepare)
	mux.HandleFunc("POST "+adminapi.PathRestoreFinish, d.handleRestoreFinish)
	mux.HandleFunc("POST "+adminapi.PathStandby, d.handleStandby)
	mux.HandleFunc("POST "+adminapi.PathFailover, d.handleFailover)
	return &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
}

// maxAdminRequest bounds an admin request's body.
const maxAdminRequest = 1 << 20

func (d *Daemon) handleMigrate(w http.ResponseWriter, r *http.Request) {
	var req adminapi.MigrateRequest
	if err := strictjson.DecodeReader(r.Body, &req, maxAdminRequest); err != nil || req.To == "" || len(req.VMs) == 0 {
		adminapi.WriteError(w, http.StatusBadRequest, fmt.Errorf("want {\"vms\": [...], \"to\": \"HOST\"}"))
		return
	}
	ids := make([]string, 0, len(req.VMs))
	for _, ref := range req.VMs {
		id, err := d.resolveVM(r.Context(), ref)
		if err != nil {
			adminapi.WriteError(w, http.StatusNotFound, err)
			return
		}
		ids = append(ids, id)
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	flush := func() {
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
	}
	res, err := d.node.Migrate(r.Context(), migrate.Request{VMs: ids, Dest: req.To}, func(p migrate.Phase, detail string) {
		_ = enc.Encode(adminapi.MigrateEvent{Phase: string(p), Detail: detail})
		flush()
	})
	end := adminapi.MigrateEvent{Done: true, Result: apiResult(res), Code: errclass.CodeOf(err), Reasons: errclass.Reasons(err)}
	if err != nil {
		end.Error = err.Error()
	}
	_ = enc.Encode(end)
	flush()
}

// resolveVM maps a VM name or UUID to its UUID: vm.json records first, then
// the hypervisor's domain names.
func (d *Daemon) resolveVM(ctx context.Context, ref string) (string, error) {
	if vtpm.CheckVMID(ref) == nil {
		return ref, nil
	}
	if vm, err := d.host.FindVM(ref); err == nil {
		return vm.UUID, nil
	}
	doms, _ := d.hyp.Domains(ctx)
	for _, dom := range doms {
		if dom.Name == ref {
			return dom.UUID, nil
		}
	}
	return "", fmt.Errorf("%w: %q", host.ErrVMNotFound, ref)
}

// VMs lists the VMs this host owns or runs.
func (d *Daemon) VMs(ctx context.Context) ([]adminapi.VMInfo, error) {
	byID := map[string]*adminapi.VMInfo{}
	get := func(id string) *adminapi.VMInfo {
		if v, ok := byID[id]; ok {
			return v
		}
		v := &adminapi.VMInfo{UUID: id, State: string(hypervisor.StateAbsent)}
		byID[id] = v
		return v
	}
	// Every envelope is checked (no TPM command): one damaged envelope
	// marks its VM and leaves the others listed and usable.
	checks, err := d.host.CheckKeys(ctx)
	if err != nil {
		return nil, err
	}
	for id, c := range checks {
		v := get(id)
		v.Generation = c.Generation
		if c.Damaged {
			v.Damaged = fmt.Sprintf("key envelope %s: %s", c.File, c.Reason)
			continue
		}
		v.Owned, v.Rotate = true, d.host.NeedsRotation(id)
	}
	doms, _ := d.hyp.Domains(ctx)
	for _, dom := range doms {
		v := get(dom.UUID)
		v.Name, v.State = dom.Name, string(dom.State)
	}
	recs, _ := d.host.ListVMs(ctx)
	for _, r := range recs {
		if v, ok := byID[r.UUID]; ok && v.Name == "" {
			v.Name = r.Name
		}
	}
	aparts, _ := d.ledger.Aparts()
	for _, a := range aparts {
		if v, ok := byID[a.VM]; ok && v.Owned {
			v.DomainOn = a.Host
		}
	}
	out := make([]adminapi.VMInfo, 0, len(byID))
	for _, v := range byID {
		if tx, ok := d.node.Incoming(v.UUID); ok {
			v.PendingTx = tx.ID
		}
		out = append(out, *v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name+out[i].UUID < out[j].Name+out[j].UUID })
	return out, nil
}

func (d *Daemon) handleVMs(w http.ResponseWriter, r *http.Request) {
	vms, err := d.VMs(r.Context())
	if err != nil {
		adminapi.WriteError(w, http.StatusInternalServerError, err)
		return
	}
	adminapi.WriteJSON(w, http.StatusOK, vms)
}

func (d *Daemon) handleVM(w http.ResponseWriter, r *http.Request) {
	id, err := d.resolveVM(r.Context(), r.PathValue("ref"))
	if err != nil {
		adminapi.WriteError(w, http.StatusNotFound, err)
		return
	}
	vms, err := d.VMs(r.Context())
	if err != nil {
		adminapi.WriteError(w, http.StatusInternalServerError, err)
		return
	}
	info := adminapi.VMInfo{UUID: id, State: string(hypervisor.StateAbsent)}
	for _, v := range vms {
		if v.UUID == id {
			info = v
		}
	}
	txs, _ := d.ledger.All()
	for _, tx := range txs {
		for _, vm := range tx.VMs {
			if vm.UUID == id {
				info.Transactions = append(info.Transactions, apiTx(tx))
			}
		}
	}
	d.addStandbyInfo(r.Context(), &info)
	adminapi.WriteJSON(w, http.StatusOK, info)
}

func (d *Daemon) handleHosts(w http.ResponseWriter, r *http.Request) {
	if d.reg != nil {
		hosts, err := d.registryHosts(r.Context())
		if err != nil {
			adminapi.WriteError(w, http.StatusServiceUnavailable, err)
			return
		}
		adminapi.WriteJSON(w, http.StatusOK, hosts)
		return
	}
	self := d.cfg.Listen
	if a := d.WireAddr(); a != nil {
		self = a.String()
	}
	out := []adminapi.HostInfo{{Host: d.cfg.HostID, Address: self, Self: true, Reachable: true}}
	names := make([]string, 0, len(d.cfg.Peers))
	for h := range d.cfg.Peers {
		names = append(names, h)
	}
	sort.Strings(names)
	for _, h := range names {
		hi := adminapi.HostInfo{Host: h, Address: d.cfg.Peers[h]}
		ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
		err := d.ping(ctx, h)
		cancel()
		hi.Reachable = err == nil
		if err != nil {
			hi.Error = err.Error()
		}
		out = append(out, hi)
	}
	adminapi.WriteJSON(w, http.StatusOK, out)
}

func (d *Daemon) handleEnroll(w http.ResponseWriter, r *http.Request) {
	host := r.PathValue("host")
	var req adminapi.EnrollRequest
	if err := strictjson.DecodeReader(r.Body, &req, maxAdminRequest); err != nil {
		adminapi.WriteError(w, http.StatusBadRequest, fmt.Errorf("want {} or {\"addr\": \"HOST:PORT\"}"))
		return
	}
	ctx := r.Context()
	if req.Addr != "" {
		if d.wire == nil {
			adminapi.WriteError(w, http.StatusBadRequest, fmt.Errorf("%w: no tls configured, this host cannot reach peers", migrate.ErrPeer))
			return
		}
		d.addrs.Store(host, req.Addr)
	}
	var (
		res *migrate.EnrollResult
		err error
	)
	switch {
	case d.reg != nil:
		res, err = d.enrollForRegistry(ctx, host)
	default:
		if _, ok := d.cfg.Peers[host]; !ok && req.Addr == "" {
			adminapi.WriteError(w, http.StatusNotFound, fmt.Errorf("%q is not in peers", host))
			return
		}
		res, err = d.Enroll(ctx, host)
	}
	if err != nil {
		adminapi.WriteJSON(w, http.StatusOK, adminapi.EnrollInfo{Host: host, Error: err.Error(), Code: errclass.CodeOf(err), Reasons: errclass.Reasons(err)})
		return
	}
	if req.Replaces != "" {
		d.auditReenrolment(ctx, host, req.Replaces, res)
	}
	adminapi.WriteJSON(w, http.StatusOK, enrollInfo(host, res, d.reg != nil))
}

// Enroll verifies a peer's EK, activates its AK and records the enrolment
// in this host's attestation.enrollments.
func (d *Daemon) Enroll(ctx context.Context, host string) (*migrate.EnrollResult, error) {
	if d.enroll == nil {
		return nil, fmt.Errorf("enroll %s: %w: this host has no attestation policy configured", host, migrate.ErrRefused)
	}
	return d.node.Enroll(ctx, host, d.enroll)
}

// ping asks a peer about a transaction that cannot exist: it proves the
// peer is up and that mutual TLS works both ways.
func (d *Daemon) ping(ctx context.Context, host string) error {
	p, err := d.dial(ctx, host)
	if err != nil {
		return err
	}
	nonce, _ := attest.NewNonce(nil)
	_, err = p.Status(ctx, &migrate.StatusRequest{TxID: fmt.Sprintf("%x", nonce[:16]), From: d.cfg.HostID})
	return err
}

func (d *Daemon) handleAudit(w http.ResponseWriter, r *http.Request) {
	f, err := os.Open(d.cfg.AuditLogPath())
	if err != nil {
		adminapi.WriteError(w, http.StatusInternalServerError, err)
		return
	}
	defer f.Close()
	vm, event := r.URL.Query().Get("vm"), r.URL.Query().Get("event")
	var recs []audit.Record
	sum, err := audit.Read(f, func(rec audit.Record) error {
		if (vm == "" || rec.VM == vm) && (event == "" || rec.Event == audit.Event(event)) {
			recs = append(recs, rec)
		}
		return nil
	})
	resp := adminapi.AuditLog{Records: recs, Total: sum.Records, Head: sum.Last, Chain: adminapi.ChainIntact}
	if err != nil {
		resp.Chain = err.Error()
	}
	adminapi.WriteJSON(w, http.StatusOK, resp)
}

// apiResult is a migration's result as the admin API reports it.
func apiResult(r *migrate.Result) *adminapi.Result {
	if r == nil {
		return nil
	}
	out := &adminapi.Result{TxID: r.TxID, Committed: r.Committed, Failed: r.Failed, Warm: r.Warm, RoundTrips: r.RoundTrips}
	out.Registry.RoundTrips, out.Registry.Time = r.Registry.RoundTrips, r.Registry.Time
	return out
}

// apiTx is a ledger transaction as the admin API reports it.
func apiTx(tx migrate.Tx) adminapi.Tx {
	out := adminapi.Tx{ID: tx.ID, Role: string(tx.Role), Peer: tx.Peer, State: string(tx.State), Reason: tx.Reason,
		Pulled: tx.Pulled, Lease: tx.Lease, Created: tx.Created, Updated: tx.Updated}
	for _, vm := range tx.VMs {
		out.VMs = append(out.VMs, adminapi.TxVM{UUID: vm.UUID, Name: vm.Name, Generation: vm.Generation, Outcome: string(vm.Outcome), Error: vm.Error})
	}
	return out
}
