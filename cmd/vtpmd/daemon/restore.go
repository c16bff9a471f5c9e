package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/atomicfile"
	"github.com/vtpmm/vtpmm/internal/strictjson"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/vtpm"
)

// Restores from escrow (docs/recovery.md). vtpmctl, holding a VM key k
// custodians rebuilt, asks this vtpmd to attest the destination with its
// policy (PathRestoreAttest: migrate.Node.AttestDest, a migration
// source's check) and to relay the batch it wrapped for the destination's
// TPM (PathRestorePrepare, PathRestoreFinish). As a destination, vtpmd
// stages each restored vTPM state below DATA_DIR/restore/TX and puts it in
// place when the restore commits (restoredStates).

// maxRestoreRequest bounds a relayed restore (the states included).
const maxRestoreRequest = 8 << 20

func (d *Daemon) handleRestoreAttest(w http.ResponseWriter, r *http.Request) {
	var req adminapi.RestoreAttestRequest
	if err := strictjson.DecodeReader(r.Body, &req, maxAdminRequest); err != nil || req.Host == "" {
		adminapi.WriteError(w, http.StatusBadRequest, fmt.Errorf("want {\"host\": \"HOST\"}"))
		return
	}
	mk, dig, warm, err := d.node.AttestDest(r.Context(), req.Host)
	if err != nil {
		adminapi.WriteError(w, http.StatusForbidden, err)
		return
	}
	adminapi.WriteJSON(w, http.StatusOK, adminapi.RestoreAttestResponse{Source: d.cfg.HostID, Dest: req.Host, MKPublic: mk, EvidenceDigest: dig, Warm: warm})
}

func (d *Daemon) handleRestorePrepare(w http.ResponseWriter, r *http.Request) {
	b, err := io.ReadAll(io.LimitReader(r.Body, maxRestoreRequest+1))
	if err != nil {
		adminapi.WriteError(w, http.StatusBadRequest, err)
		return
	}
	req, err := migrate.DecodeRestore(b)
	if err != nil {
		adminapi.WriteError(w, http.StatusBadRequest, err)
		return
	}
	resp, err := d.node.RelayRestore(r.Context(), req)
	if err != nil {
		adminapi.WriteError(w, http.StatusForbidden, err)
		return
	}
	adminapi.WriteJSON(w, http.StatusOK, resp)
}

func (d *Daemon) handleRestoreFinish(w http.ResponseWriter, r *http.Request) {
	var req adminapi.RestoreFinishRequest
	var fin migrate.FinishRequest
	if err := strictjson.DecodeReader(r.Body, &req, maxAdminRequest); err != nil || req.Dest == "" || strictjson.Decode(req.Finish, &fin, maxAdminRequest) != nil {
		adminapi.WriteError(w, http.StatusBadRequest, fmt.Errorf("want {\"dest\": \"HOST\", \"finish\": {...}}"))
		return
	}
	resp, err := d.node.RelayFinish(r.Context(), req.Dest, &fin)
	if err != nil {
		adminapi.WriteError(w, http.StatusForbidden, err)
		return
	}
	adminapi.WriteJSON(w, http.StatusOK, resp)
}

// restoredStates is the daemon's migrate.RestoredStates: a restore's
// states wait in DATA_DIR/restore/TX/VM (0600) until the commit, which
// writes each as the VM's swtpm state file (atomically) in the directory
// the hypervisor names for the VM, else in DATA_DIR/vms/VM/tpm2.
type restoredStates struct{ d *Daemon }

var _ migrate.RestoredStates = restoredStates{}

func (s restoredStates) staged(txID, vm string) (string, error) {
	if vtpm.CheckVMID(vm) != nil || !validTxID(txID) {
		return "", fmt.Errorf("restored state: %w: transaction %q, VM %q", migrate.ErrBadMessage, txID, vm)
	}
	return filepath.Join(s.d.cfg.DataDir, "restore", txID, vm), nil
}

func validTxID(s string) bool {
	if len(s) != 32 {
		return false
	}
	for _, c := range s {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func (s restoredStates) Stage(ctx context.Context, txID, vm string, blob []byte) error {
	p, err := s.staged(txID, vm)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}
	return atomicfile.WriteFile(p, blob, 0o600)
}

func (s restoredStates) Place(ctx context.Context, txID, vm string) error {
	p, err := s.staged(txID, vm)
	if err != nil {
		return err
	}
	blob, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil // a migration, or placed before a crash
	}
	if err != nil {
		return err
	}
	dir := s.d.vmStateDir(ctx, vm)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, stateFile), blob, 0o600); err != nil {
		return fmt.Errorf("put the restored vTPM state of %s in place: %w", vm, err)
	}
	s.d.log.WithField("vm", vm).WithField("dir", dir).Info("restored vTPM state in place")
	return s.remove(p)
}

func (s restoredStates) Drop(ctx context.Context, txID, vm string) error {
	p, err := s.staged(txID, vm)
	if err != nil {
		return err
	}
	return s.remove(p)
}

// remove deletes a staged state and its transaction's directory once empty.
func (s restoredStates) remove(p string) error {
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	_ = os.Remove(filepath.Dir(p)) // fails while other VMs of the batch wait
	return nil
}
