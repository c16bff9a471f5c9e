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
// vTPM state re-encrypted under the new key, once the VM stopped after it
// arrived by migration (the hypervisor's stopped event; never inside a
// libvirt hook, which holds the domain's lock), at vtpmd's own starts on
// hosts without a hypervisor (vtpm/host.StartVM), and on
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
//
// The hypervisor is asked (domain state, vTPM state directory, managed
// save) before rekeyMu is taken, never under it: libvirt holds a domain's
// lock while it runs that domain's hooks, and the prepare-begin hook waits
// for rekeyMu, so a libvirt domain call under rekeyMu could deadlock with a
// start. A start that slips in between is caught by swtpm's state lock
// (swtpm.ErrStateInUse, class in-use) or is serialised by rekeyMu before
// libvirt starts swtpm.
func (d *Daemon) Rekey(ctx context.Context, vm, why string) (host.RekeyResult, error) {
	if err := d.checkRekeyable(ctx, vm); err != nil { // the key's own state first: damaged, not here, busy
		return host.RekeyResult{}, err
	}
	plan, err := d.planRekey(ctx, vm)
	if err != nil {
		return host.RekeyResult{}, err
	}
	d.rekeyMu.Lock()
	defer d.rekeyMu.Unlock()
	return d.rekey(ctx, vm, why, plan)
}

// rekeyPlan is what the hypervisor told about a VM's vTPM state.
type rekeyPlan struct {
	stateDir string
	define   func(pass []byte) error
}

// planRekey asks the hypervisor where the shut-off VM's vTPM state is (or
// takes vtpmd's own layout when vtpmd runs the vTPMs). No lock is held.
func (d *Daemon) planRekey(ctx context.Context, vm string) (rekeyPlan, error) {
	if d.RunsVTPMs() {
		return rekeyPlan{stateDir: d.host.Layout().VMState(vm)}, nil
	}
	dom, err := d.hyp.Domain(ctx, vm)
	if err != nil {
		return rekeyPlan{}, fmt.Errorf("rekey %s: %w", vm, err)
	}
	if dom.State == hypervisor.StateAbsent {
		return rekeyPlan{}, fmt.Errorf("rekey %s: %w: the hypervisor on %s does not define the VM", vm, hypervisor.ErrNoDomain, d.cfg.HostID)
	}
	if dom.State != hypervisor.StateShutoff {
		return rekeyPlan{}, fmt.Errorf("rekey %s: %w: the VM is %s on %s; shut it off first (its running vTPM holds the state)",
			vm, host.ErrVMRunning, dom.State, d.cfg.HostID)
	}
	st, ok := d.hyp.(vtpmStates)
	if !ok {
		return rekeyPlan{}, fmt.Errorf("rekey %s: hypervisor %s cannot name the VM's vTPM state directory", vm, d.hyp.Name())
	}
	dir, err := st.VTPMStateDir(ctx, vm)
	if err != nil {
		return rekeyPlan{}, fmt.Errorf("rekey %s: %w", vm, err)
	}
	return rekeyPlan{stateDir: dir, define: func(pass []byte) error { return d.hyp.DefineSecret(ctx, vm, pass) }}, nil
}

// rekey runs with rekeyMu held and makes no libvirt domain call (the
// secret's definition is the secret driver's).
func (d *Daemon) rekey(ctx context.Context, vm, why string, plan rekeyPlan) (host.RekeyResult, error) {
	if err := d.checkRekeyable(ctx, vm); err != nil {
		return host.RekeyResult{}, err
	}
	res, err := d.host.Rekey(ctx, vm, plan.stateDir, plan.define)
	if err != nil && res.VM == "" {
		return res, err
	}
	d.auditRekey(ctx, vm, fmt.Sprintf("%s; generation %d, %d bytes of vTPM state re-encrypted in %v", why, res.Generation, res.Bytes, res.Elapsed.Round(time.Millisecond)))
	return res, err
}

// checkRekeyable refuses a VM whose key is not here, is damaged, or is
// held by an open transaction.
func (d *Daemon) checkRekeyable(ctx context.Context, vm string) error {
	checks, err := d.host.CheckKeys(ctx)
	if err != nil {
		return err
	}
	c, ok := checks[vm]
	switch {
	case !ok:
		return fmt.Errorf("rekey %s: %w: %s holds no key for it", vm, migrate.ErrNotOwner, d.cfg.HostID)
	case c.Damaged:
		return fmt.Errorf("rekey %s: %w: %s", vm, host.ErrVMDamaged, c.Reason)
	}
	if tx, ok := d.holder(vm); ok {
		return fmt.Errorf("rekey %s: %w: transaction %s holds the VM", vm, migrate.ErrBusy, tx)
	}
	return nil
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

// rotateStopped replaces the key of a VM that arrived by migration once
// it stopped here (the hypervisor's lifecycle event), so that its next
// cold start uses a key no former holder has. It runs in the background,
// after settleDelay, outside any hook (libvirt is asked about the domain).
// A refusal (the VM started again, a managed save image, an open
// transaction) is logged; the VM stays marked and its next stop tries
// again.
func (d *Daemon) rotateStopped(vm string) {
	if d.RunsVTPMs() || !d.host.NeedsRotation(vm) {
		return
	}
	d.bg.Add(1)
	go func() {
		defer d.bg.Done()
		select {
		case <-d.bgCtx.Done():
			return
		case <-time.After(settleDelay):
		}
		ctx, cancel := context.WithTimeout(d.bgCtx, adminapi.HookTimeout)
		defer cancel()
		log := d.log.WithField("vm", vm)
		if _, err := d.Rekey(ctx, vm, "first stop after a migration"); err != nil {
			log.WithError(err).Warn("key rotation after the VM stopped failed; it stays marked and rotates at its next stop")
			return
		}
		log.Info("VM key rotated after its first stop since it arrived by migration")
	}()
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
