package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/vtpm/host"
)

// Key rotation (docs/rekey.md): a VM's key is replaced, and its shut-off
// vTPM state re-encrypted under the new key, at the VM's next cold start
// after it arrived by migration (hook mode's "prepare begin", and vtpmd's
// own starts on hosts without a hypervisor: vtpm/host.StartVM), and on
// demand with 'vtpmctl vm rekey VM' (POST PathVMs/{ref}/rekey). The
// hypervisor's secret is redefined with the new key. A former holder's
// copy of the old key then opens nothing.

// vtpmStates is implemented by hypervisors that name a VM's vTPM state
// directory (the fake; libvirt: /var/lib/libvirt/swtpm/UUID/tpm2).
type vtpmStates interface {
	VTPMStateDir(ctx context.Context, vmUUID string) (string, error)
}

// Rekey replaces a VM's key now. The VM must be owned here, usable, in no
// open transaction and shut off (host.ErrVMRunning otherwise, class
// in-use).
func (d *Daemon) Rekey(ctx context.Context, vm, why string) (host.RekeyResult, error) {
	d.rekeyMu.Lock()
	defer d.rekeyMu.Unlock()
	return d.rekey(ctx, vm, why, true)
}

// rekey runs with rekeyMu held; starting is set on a cold start (hook
// "prepare begin"), when the domain is on its way up and its state must
// not be checked.
func (d *Daemon) rekey(ctx context.Context, vm, why string, checkShutoff bool) (host.RekeyResult, error) {
	checks, err := d.host.CheckKeys(ctx)
	if err != nil {
		return host.RekeyResult{}, err
	}
	c, ok := checks[vm]
	switch {
	case !ok:
		return host.RekeyResult{}, fmt.Errorf("rekey %s: %w: %s holds no key for it", vm, migrate.ErrNotOwner, d.cfg.HostID)
	case c.Damaged:
		return host.RekeyResult{}, fmt.Errorf("rekey %s: %w: %s", vm, host.ErrVMDamaged, c.Reason)
	}
	if tx, ok := d.holder(vm); ok {
		return host.RekeyResult{}, fmt.Errorf("rekey %s: %w: transaction %s holds the VM", vm, migrate.ErrBusy, tx)
	}
	var (
		stateDir string
		define   func(pass []byte) error
	)
	if d.RunsVTPMs() {
		stateDir = d.host.Layout().VMState(vm)
	} else {
		if checkShutoff {
			dom, err := d.hyp.Domain(ctx, vm)
			if err != nil {
				return host.RekeyResult{}, fmt.Errorf("rekey %s: %w", vm, err)
			}
			if dom.State == hypervisor.StateAbsent {
				return host.RekeyResult{}, fmt.Errorf("rekey %s: %w: the hypervisor on %s does not define the VM", vm, hypervisor.ErrNoDomain, d.cfg.HostID)
			}
			if dom.State != hypervisor.StateShutoff {
				return host.RekeyResult{}, fmt.Errorf("rekey %s: %w: the VM is %s on %s; shut it off first (its running vTPM holds the state)",
					vm, host.ErrVMRunning, dom.State, d.cfg.HostID)
			}
		}
		st, ok := d.hyp.(vtpmStates)
		if !ok {
			return host.RekeyResult{}, fmt.Errorf("rekey %s: hypervisor %s cannot name the VM's vTPM state directory", vm, d.hyp.Name())
		}
		if stateDir, err = st.VTPMStateDir(ctx, vm); err != nil {
			return host.RekeyResult{}, fmt.Errorf("rekey %s: %w", vm, err)
		}
		define = func(pass []byte) error { return d.hyp.DefineSecret(ctx, vm, pass) }
	}
	res, err := d.host.Rekey(ctx, vm, stateDir, define)
	if err != nil && res.VM == "" {
		return res, err
	}
	d.auditRekey(ctx, vm, fmt.Sprintf("%s; generation %d, %d bytes of vTPM state re-encrypted in %v", why, res.Generation, res.Bytes, res.Elapsed.Round(time.Millisecond)))
	return res, err
}

// holder returns the open transaction that holds the VM, if any.
func (d *Daemon) holder(vm string) (string, bool) {
	txs, err := d.ledger.OpenTxs()
	if err != nil {
		return "", false
	}
	for _, tx := range txs {
		for _, v := range tx.VMs {
			if v.UUID == vm {
				return tx.ID, true
			}
		}
	}
	return "", false
}

// rotateOnStart replaces the key of a VM that arrived by migration, at its
// cold start (hook "prepare begin"). A failure is logged and the start
// goes on with the key the state opens with: the VM stays marked, and its
// next start tries again.
func (d *Daemon) rotateOnStart(ctx context.Context, vm string) {
	if !d.host.NeedsRotation(vm) {
		return
	}
	log := d.log.WithField("vm", vm)
	if _, err := d.rekey(ctx, vm, "cold start after a migration", false); err != nil {
		log.WithError(err).Warn("key rotation at the cold start failed; the VM starts with its current key and rotates at its next start")
		return
	}
	log.Info("VM key rotated at its first cold start after a migration")
}

func (d *Daemon) handleRekey(w http.ResponseWriter, r *http.Request) {
	id, err := d.resolveVM(r.Context(), r.PathValue("ref"))
	if err != nil {
		adminapi.WriteError(w, http.StatusNotFound, err)
		return
	}
	res, err := d.Rekey(r.Context(), id, "vtpmctl vm rekey")
	if err != nil {
		status := http.StatusInternalServerError
		switch {
		case errors.Is(err, host.ErrVMRunning), errors.Is(err, migrate.ErrBusy), errors.Is(err, hypervisor.ErrManagedSave):
			status = http.StatusConflict
		case errors.Is(err, migrate.ErrNotOwner):
			status = http.StatusNotFound
		}
		d.log.WithError(err).WithFields(logrus.Fields{"vm": id}).Warn("rekey refused")
		adminapi.WriteError(w, status, err)
		return
	}
	adminapi.WriteJSON(w, http.StatusOK, adminapi.RekeyInfo{UUID: id, Generation: res.Generation, Bytes: res.Bytes,
		Took: res.Elapsed.Round(time.Millisecond).String()})
}
