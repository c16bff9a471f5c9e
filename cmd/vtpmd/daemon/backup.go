package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/internal/strictjson"
	"github.com/vtpmm/vtpmm/migrate/escrow"
)

// Backups (docs/escrow.md, docs/recovery.md). For each VM this host owns,
// vtpmd seals one escrow bundle: the VM's vTPM state as it is at rest
// (already encrypted under the VM key), the VM key sealed for the
// configured custodians (k of n), the VM's identity, generation and the
// time, authenticated as a whole (migrate/escrow). The VM key is opened
// under the vault key that is in memory: a backup costs 0 host TPM
// commands. Bundles are written atomically below a directory
// (escrow.Layout) and old ones pruned (escrow.Retain). 'vtpmctl backup'
// asks for one now (POST PathBackup); backup.interval schedules them.

// stateFile is the file of swtpm's state that holds the whole vTPM
// (permanent state; swtpm replaces it atomically when it changes).
const stateFile = "tpm2-00.permall"

// openEscrow builds the custodians' policy and the sealer from the
// escrow section (no custodians: no sealer, backups refused).
func (d *Daemon) openEscrow() error {
	if len(d.cfg.Escrow.Custodians) == 0 {
		return nil
	}
	p, err := d.cfg.Escrow.Policy(escrow.NonInteractiveUI(d.log))
	if err != nil {
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if d.sealer, err = escrow.NewSealer(p, escrow.SealerOptions{Rand: d.deps.Host.Rand, Now: d.now, Log: d.log}); err != nil {
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	d.log.WithFields(logrus.Fields{"k": p.Threshold(), "n": len(p.Custodians()), "post_quantum_safe": p.PostQuantumSafe()}).Info("escrow custodians configured")
	return nil
}

// Backup writes one bundle per VM of req (every owned VM with req.All)
// into req.Dir (default backup.dir) and prunes each VM's old bundles. A VM
// that fails is reported in its item; the others are backed up.
func (d *Daemon) Backup(ctx context.Context, req adminapi.BackupRequest) (adminapi.BackupReport, error) {
	t0 := time.Now()
	tpm0 := d.host.Meter().Stats()
	rep := adminapi.BackupReport{Host: d.cfg.HostID, Dir: req.Dir}
	if rep.Dir == "" {
		rep.Dir = d.cfg.Backup.Dir
	}
	switch {
	case d.sealer == nil:
		return rep, fmt.Errorf("backup: %w: no escrow custodians are configured on %s (escrow.custodians, escrow.threshold)", ErrConfig, d.cfg.HostID)
	case rep.Dir == "":
		return rep, fmt.Errorf("backup: %w: no directory: give one (-o DIR) or configure backup.dir", ErrConfig)
	case len(req.VMs) == 0 && !req.All:
		return rep, fmt.Errorf("backup: name the VMs or ask for all of them")
	}
	abs, err := filepath.Abs(rep.Dir)
	if err != nil {
		return rep, fmt.Errorf("backup: %w", err)
	}
	rep.Dir = abs
	var ids []string
	if req.All {
		infos, err := d.host.Keys().List(ctx)
		if err != nil {
			return rep, fmt.Errorf("backup: %w", err)
		}
		for _, k := range infos {
			ids = append(ids, k.VMID)
		}
	}
	for _, ref := range req.VMs {
		id, err := d.resolveVM(ctx, ref)
		if err != nil {
			rep.Items = append(rep.Items, adminapi.BackupItem{Name: ref, Error: err.Error()})
			continue
		}
		ids = append(ids, id)
	}
	keep := d.cfg.Backup.Keep
	if keep == 0 {
		keep = DefaultBackupKeep
	}
	w := &escrow.Writer{Layout: escrow.Layout{Dir: abs}, Keep: keep, Log: d.log}
	for _, id := range ids {
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		rep.Items = append(rep.Items, d.backupVM(ctx, w, id))
	}
	rep.TPMCommands = d.host.Meter().Stats().Sub(tpm0).Total
	rep.Took = time.Since(t0)
	d.log.WithFields(logrus.Fields{"vms": len(rep.Items), "failed": rep.Failed(), "dir": abs, "tpm_commands": rep.TPMCommands, "took": rep.Took.Round(time.Millisecond)}).Info("backup done")
	return rep, nil
}

// backupVM seals and writes one VM's bundle. The key and the state are
// read under rekeyMu, so a key rotation never pairs a key with a state it
// did not encrypt.
func (d *Daemon) backupVM(ctx context.Context, w *escrow.Writer, id string) adminapi.BackupItem {
	it := adminapi.BackupItem{UUID: id, Name: d.vmName(ctx, id)}
	fail := func(err error) adminapi.BackupItem {
		it.Error = err.Error()
		d.log.WithError(err).WithField("vm", id).Error("backup of a VM failed")
		return it
	}
	if d.RunsVTPMs() {
		return fail(fmt.Errorf("backup %s: this host runs vTPMs without a hypervisor; their state is live in swtpm (not built)", id))
	}
	d.rekeyMu.Lock()
	key, gen, err := d.host.Keys().Get(ctx, id)
	var state []byte
	if err == nil {
		state, err = d.readState(ctx, id)
		if err != nil {
			key.Destroy()
		}
	}
	d.rekeyMu.Unlock()
	if err != nil {
		return fail(fmt.Errorf("backup %s: %w", id, err))
	}
	defer key.Destroy()
	it.Generation = gen
	b, err := d.sealer.Seal(ctx, escrow.Contents{
		VM: escrow.VM{UUID: id, Name: it.Name}, Generation: gen, SourceHost: d.cfg.HostID,
		VaultKeyID: d.host.VaultKeyID(), State: state,
	}, key)
	if err != nil {
		return fail(err)
	}
	h, err := escrow.Inspect(b)
	if err != nil {
		return fail(err)
	}
	if it.Path, err = w.Write(ctx, b); err != nil {
		return fail(err)
	}
	it.Bundle, it.Bytes = h.ID, len(b)
	if it.Removed, err = w.Prune(ctx, id, gen); err != nil {
		d.log.WithError(err).WithField("vm", id).Warn("pruning old bundles failed")
	}
	if err := d.audit.Append(ctx, audit.Record{Event: audit.EventBackup, VM: id, Generation: gen,
		Detail: fmt.Sprintf("bundle %s, %d of %d custodians, %s", h.ID, h.Threshold, h.N, it.Path)}); err != nil {
		d.log.WithError(err).Error("audit log append failed")
	}
	return it
}

// vmName is the VM's name: the hypervisor's, else vm.json's, else its UUID.
func (d *Daemon) vmName(ctx context.Context, id string) string {
	if dom, err := d.hyp.Domain(ctx, id); err == nil && dom.Name != "" {
		return dom.Name
	}
	if vm, err := d.host.FindVM(id); err == nil && vm.Name != "" {
		return vm.Name
	}
	return id
}

// vmStateDir is the directory of the VM's vTPM state here: the
// hypervisor's (the domain is defined), else this host's own layout.
func (d *Daemon) vmStateDir(ctx context.Context, id string) string {
	if st, ok := d.hyp.(vtpmStates); ok {
		if dom, err := d.hyp.Domain(ctx, id); err == nil && dom.State != hypervisor.StateAbsent {
			if dir, err := st.VTPMStateDir(ctx, id); err == nil {
				return dir
			}
		}
	}
	return d.host.Layout().VMState(id)
}

// readState reads the VM's vTPM state as it is at rest (encrypted under
// the VM key).
func (d *Daemon) readState(ctx context.Context, id string) ([]byte, error) {
	p := filepath.Join(d.vmStateDir(ctx, id), stateFile)
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no vTPM state at %s", p)
	}
	if err != nil {
		return nil, err
	}
	if len(b) > escrow.MaxState {
		return nil, fmt.Errorf("vTPM state %s of %d bytes (limit %d)", p, len(b), escrow.MaxState)
	}
	return b, nil
}

// backupLoop backs up every owned VM every backup.interval.
func (d *Daemon) backupLoop(ctx context.Context) error {
	iv, _ := d.cfg.backupInterval()
	t := time.NewTicker(iv)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		rep, err := d.Backup(ctx, adminapi.BackupRequest{All: true})
		if err != nil {
			d.log.WithError(err).Error("scheduled backup failed")
			continue
		}
		if n := rep.Failed(); n > 0 {
			d.log.WithFields(logrus.Fields{"failed": n, "vms": len(rep.Items)}).Error("scheduled backup: some VMs have no new bundle")
		}
	}
}

func (d *Daemon) handleBackup(w http.ResponseWriter, r *http.Request) {
	var req adminapi.BackupRequest
	if err := strictjson.DecodeReader(r.Body, &req, maxAdminRequest); err != nil {
		adminapi.WriteError(w, http.StatusBadRequest, fmt.Errorf("want {\"vms\": [...], \"all\": bool, \"dir\": \"DIR\"}: %v", err))
		return
	}
	rep, err := d.Backup(r.Context(), req)
	if err != nil {
		adminapi.WriteError(w, http.StatusBadRequest, err)
		return
	}
	adminapi.WriteJSON(w, http.StatusOK, rep)
}
