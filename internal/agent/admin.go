package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/vtpm"
)

// The admin API is vtpmctl's local access to vtpmd: JSON over HTTP on a
// unix socket that only root can open (mode 0600). Migrations stream their
// progress as JSON lines.

// MigrateRequest is POST /v1/migrate.
type MigrateRequest struct {
	VMs []string `json:"vms"` // names or UUIDs
	To  string   `json:"to"`
}

// MigrateEvent is one line of the /v1/migrate stream: a phase, or the end.
type MigrateEvent struct {
	Phase  string          `json:"phase,omitempty"`
	Detail string          `json:"detail,omitempty"`
	Done   bool            `json:"done,omitempty"`
	Result *migrate.Result `json:"result,omitempty"`
	Error  string          `json:"error,omitempty"`
	// Code classifies the end: ok, refused, aborted, unresolved, busy, error.
	Code string `json:"code,omitempty"`
}

// VMInfo is a VM as GET /v1/vms reports it.
type VMInfo struct {
	Name         string       `json:"name"`
	UUID         string       `json:"uuid"`
	Generation   uint64       `json:"generation"`
	State        string       `json:"state"` // hypervisor state here
	Owned        bool         `json:"owned"` // this host holds the active key
	PendingTx    string       `json:"pending_tx,omitempty"`
	Transactions []migrate.Tx `json:"transactions,omitempty"`
}

// HostInfo is a host as GET /v1/hosts reports it.
type HostInfo struct {
	Host      string `json:"host"`
	Address   string `json:"address"`
	Self      bool   `json:"self,omitempty"`
	Reachable bool   `json:"reachable"`
	Error     string `json:"error,omitempty"`
}

func (d *Daemon) adminListener() (net.Listener, error) {
	if d.dopts.AdminListener != nil {
		return d.dopts.AdminListener, nil
	}
	p := d.cfg.AdminSocketPath()
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return nil, err
	}
	_ = os.Remove(p)
	lis, err := net.Listen("unix", p)
	if err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", p, err)
	}
	if err := os.Chmod(p, 0o600); err != nil {
		lis.Close()
		return nil, err
	}
	return lis, nil
}

func (d *Daemon) serveAdmin(ctx context.Context, lis net.Listener) error {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/migrate", d.handleMigrate)
	mux.HandleFunc("GET /v1/vms", d.handleVMs)
	mux.HandleFunc("GET /v1/vms/{ref}", d.handleVM)
	mux.HandleFunc("GET /v1/hosts", d.handleHosts)
	mux.HandleFunc("POST /v1/hosts/{host}/enroll", d.handleEnroll)
	mux.HandleFunc("GET /v1/audit", d.handleAudit)
	mux.HandleFunc("POST /v1/hook/pull", d.handleHookPull)
	mux.HandleFunc("POST /v1/hook/prepare", d.handleHookPrepare)
	mux.HandleFunc("POST /v1/hook/released", d.handleHookReleased)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, err error) {
	writeJSON(w, status, map[string]string{"error": err.Error()})
}

// ErrorCode classifies a migration error for exit codes and scripts.
func ErrorCode(err error) string {
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, migrate.ErrRefused):
		return "refused"
	case errors.Is(err, migrate.ErrUnresolved):
		return "unresolved"
	case errors.Is(err, migrate.ErrBusy):
		return "busy"
	case errors.Is(err, migrate.ErrHypervisor), errors.Is(err, migrate.ErrPeer), errors.Is(err, migrate.ErrKeyProof),
		errors.Is(err, vtpm.ErrStaleGeneration):
		return "aborted"
	}
	return "error"
}

func (d *Daemon) handleMigrate(w http.ResponseWriter, r *http.Request) {
	var req MigrateRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&req); err != nil || req.To == "" || len(req.VMs) == 0 {
		writeError(w, http.StatusBadRequest, fmt.Errorf("want {\"vms\": [...], \"to\": \"HOST\"}"))
		return
	}
	ids := make([]string, 0, len(req.VMs))
	for _, ref := range req.VMs {
		id, err := d.resolveVM(r.Context(), ref)
		if err != nil {
			writeError(w, http.StatusNotFound, err)
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
		_ = enc.Encode(MigrateEvent{Phase: string(p), Detail: detail})
		flush()
	})
	end := MigrateEvent{Done: true, Result: res, Code: ErrorCode(err)}
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
	if vm, err := d.findVM(ref); err == nil {
		return vm.UUID, nil
	}
	if d.hyp != nil {
		doms, _ := d.hyp.Domains(ctx)
		for _, dom := range doms {
			if dom.Name == ref {
				return dom.UUID, nil
			}
		}
	}
	return "", fmt.Errorf("%w: %q", ErrVMNotFound, ref)
}

// VMs lists the VMs this host owns or runs.
func (d *Daemon) VMs(ctx context.Context) ([]VMInfo, error) {
	byID := map[string]*VMInfo{}
	get := func(id string) *VMInfo {
		if v, ok := byID[id]; ok {
			return v
		}
		v := &VMInfo{UUID: id, State: string(hypervisor.StateAbsent)}
		byID[id] = v
		return v
	}
	keys, err := d.keys.List(ctx)
	if err != nil {
		return nil, err
	}
	for _, k := range keys {
		v := get(k.VMID)
		v.Owned, v.Generation = true, k.Generation
	}
	if d.hyp != nil {
		doms, _ := d.hyp.Domains(ctx)
		for _, dom := range doms {
			v := get(dom.UUID)
			v.Name, v.State = dom.Name, string(dom.State)
		}
	}
	recs, _ := d.ListVMs(ctx)
	for _, r := range recs {
		if v, ok := byID[r.UUID]; ok && v.Name == "" {
			v.Name = r.Name
		}
	}
	out := make([]VMInfo, 0, len(byID))
	for _, v := range byID {
		if tx, _, err := d.keys.Pending(ctx, v.UUID); err == nil {
			v.PendingTx = tx
		}
		out = append(out, *v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name+out[i].UUID < out[j].Name+out[j].UUID })
	return out, nil
}

func (d *Daemon) handleVMs(w http.ResponseWriter, r *http.Request) {
	vms, err := d.VMs(r.Context())
	if err != nil {
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	writeJSON(w, http.StatusOK, vms)
}

func (d *Daemon) handleVM(w http.ResponseWriter, r *http.Request) {
	id, err := d.resolveVM(r.Context(), r.PathValue("ref"))
	if err != nil {
		writeError(w, http.StatusNotFound, err)
		return
	}
	vms, err := d.VMs(r.Context())
	if err != nil {
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	info := VMInfo{UUID: id, State: string(hypervisor.StateAbsent)}
	for _, v := range vms {
		if v.UUID == id {
			info = v
		}
	}
	txs, _ := d.ledger.All()
	for _, tx := range txs {
		for _, vm := range tx.VMs {
			if vm.UUID == id {
				info.Transactions = append(info.Transactions, tx)
			}
		}
	}
	writeJSON(w, http.StatusOK, info)
}

func (d *Daemon) handleHosts(w http.ResponseWriter, r *http.Request) {
	self := d.cfg.Listen
	if d.dopts.WireListener != nil {
		self = d.dopts.WireListener.Addr().String()
	}
	out := []HostInfo{{Host: d.cfg.HostID, Address: self, Self: true, Reachable: true}}
	names := make([]string, 0, len(d.cfg.Peers))
	for h := range d.cfg.Peers {
		names = append(names, h)
	}
	sort.Strings(names)
	for _, h := range names {
		hi := HostInfo{Host: h, Address: d.cfg.Peers[h]}
		ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
		err := d.ping(ctx, h)
		cancel()
		hi.Reachable = err == nil
		if err != nil {
			hi.Error = err.Error()
		}
		out = append(out, hi)
	}
	writeJSON(w, http.StatusOK, out)
}

// EnrollInfo is the answer of POST /v1/hosts/{host}/enroll.
type EnrollInfo struct {
	Host     string `json:"host"`
	EKChain  string `json:"ek_chain"`
	EKDigest string `json:"ek_digest"`
	AKName   string `json:"ak_name"`
	Error    string `json:"error,omitempty"`
	Code     string `json:"code"`
}

func (d *Daemon) handleEnroll(w http.ResponseWriter, r *http.Request) {
	host := r.PathValue("host")
	if _, ok := d.cfg.Peers[host]; !ok {
		writeError(w, http.StatusNotFound, fmt.Errorf("%q is not in peers", host))
		return
	}
	res, err := d.Enroll(r.Context(), host)
	if err != nil {
		writeJSON(w, http.StatusOK, EnrollInfo{Host: host, Error: err.Error(), Code: ErrorCode(err)})
		return
	}
	writeJSON(w, http.StatusOK, EnrollInfo{Host: host, EKChain: res.EKChain, EKDigest: fmt.Sprintf("%x", res.EKDigest),
		AKName: fmt.Sprintf("%x", res.AKName), Code: "ok"})
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
	f, err := os.Open(d.cfg.auditLogPath())
	if err != nil {
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	defer f.Close()
	vm, event := r.URL.Query().Get("vm"), r.URL.Query().Get("event")
	var recs []audit.Record
	sum, err := audit.Read(f, func(rec audit.Record) error {
		if (vm == "" || rec.VM == vm) && (event == "" || rec.Event == event) {
			recs = append(recs, rec)
		}
		return nil
	})
	resp := map[string]any{"records": recs, "total": sum.Records, "head": sum.Last, "chain": "intact"}
	if err != nil {
		resp["chain"] = err.Error()
	}
	writeJSON(w, http.StatusOK, resp)
}

// recoveryLoop retries Reconcile while transactions stay open.
func (d *Daemon) recoveryLoop(ctx context.Context) error {
	t := time.NewTicker(15 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if open, _ := d.ledger.OpenTxs(); len(open) == 0 {
				continue
			}
			if err := d.node.Reconcile(ctx); err != nil {
				d.log.WithError(err).Warn("recovery: transactions still open")
			}
		}
	}
}
