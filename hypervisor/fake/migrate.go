package fake

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
)

// libvirt's message for a migration that failed after the state was copied.
const lateFailure = "operation failed: job 'migration out' unexpectedly failed"

// rollbackTimeout bounds the clean-up after a failed migration, which runs
// even when the caller's context has ended.
const rollbackTimeout = 30 * time.Second

// Migrate live-migrates a running VM to dest, libvirt style (peer to peer,
// persistent on the destination, undefined on the source):
//
//  1. Prepare on the destination: its MigrateBegin and PrepareBegin hooks
//     run (libvirt's qemu hooks; an error refuses the migration), the VM
//     must not exist there, and its secret is read now (missing:
//     ErrSecretMissing at once).
//  2. The guest pauses; the source swtpm hands out its state blobs,
//     encrypted with the migration key, and stops (CMD_STOP).
//  3. A new swtpm starts on the destination, on a fresh state directory
//     under its Dir, with the destination's secret; the blobs are imported
//     and the TPM initialised (another secret value: ErrSecretMismatch).
//  4. BeforeMigrateCommit runs, then the migration commits: the VM runs on
//     the destination; the source swtpm stops, the source domain is
//     undefined and its state removed. The source's secret stays.
//
// On any failure after step 2 the destination's swtpm and state are removed
// and the source vTPM resumes with the exported state, so nothing the guest
// did (NV, persistent objects, PCRs, sessions) is lost.
func (h *Host) Migrate(ctx context.Context, vmUUID string, dest hypervisor.Target) (err error) {
	t0 := time.Now()
	op := fmt.Sprintf("migrate %s from %s to %s", vmUUID, h.name, targetName(dest))
	h.mu.Lock()
	d, err := h.claimLocked(vmUUID, jobOutgoing)
	if err == nil && d.proc == nil {
		d.job, err = jobNone, hypervisor.ErrNotRunning
	}
	if err == nil && h.FailNextMigrate != nil {
		d.job, err = jobNone, h.FailNextMigrate
		h.FailNextMigrate = nil
	}
	hook := h.BeforeMigrateCommit
	h.mu.Unlock()
	if err != nil {
		if !errors.Is(err, ErrBusy) {
			h.countFailure()
		}
		return fmt.Errorf("%s: %w", op, err)
	}
	log := h.log.WithField("vm", vmUUID).WithField("dest", targetName(dest))
	committed := false
	defer func() {
		if !committed {
			h.countFailure()
			h.release(d)
			log.WithError(err).Warn("migration failed; VM stays on the source")
		}
	}()

	dst, err := h.net.resolve(dest)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	h.mu.Lock()
	d.jobDest = dst.name
	h.mu.Unlock()
	if dst == h {
		return fmt.Errorf("%s: %w: Requested operation is not valid: attempt to migrate guest to the same host", op, hypervisor.ErrMigrationFailed)
	}
	if err := dst.incomingHooks(ctx, vmUUID, d.name); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	pass, dstState, err := dst.prepareIncoming(vmUUID, d.name)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	defer clear(pass)

	// The guest pauses; its vTPM state leaves the source swtpm.
	h.mu.Lock()
	d.paused = true
	proc := d.proc
	h.mu.Unlock()
	st, err := swtpm.ExportState(ctx, proc)
	if err != nil {
		dst.abortIncoming(vmUUID, dstState)
		return fmt.Errorf("%s: %w: reading the vTPM state: %w", op, hypervisor.ErrMigrationFailed, err)
	}
	h.mu.Lock()
	d.jobTotal = DefaultVMMemory + uint64(len(st.Permanent)+len(st.Volatile))
	h.mu.Unlock()
	// From here on the source TPM is stopped: every failure resumes it.
	fail := func(class, cause error) error {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), rollbackTimeout)
		defer cancel()
		dst.abortIncoming(vmUUID, dstState)
		err := fmt.Errorf("%s: %w: %s: %w", op, class, lateFailure, cause)
		if rerr := h.resume(rctx, d, st); rerr != nil {
			return fmt.Errorf("%w; and the source vTPM did not resume: %w", err, rerr)
		}
		return err
	}
	dproc, err := dst.startVTPM(ctx, vmUUID, dstState, pass, &st)
	if err != nil {
		class := hypervisor.ErrMigrationFailed
		if errors.Is(err, swtpm.ErrWrongPassphrase) {
			class = hypervisor.ErrSecretMismatch
		}
		return fail(class, fmt.Errorf("destination vTPM: %w", err))
	}
	h.mu.Lock()
	d.jobProcessed = d.jobTotal // the state is across
	h.mu.Unlock()
	herr := ctx.Err()
	if herr == nil && hook != nil {
		herr = hook()
	}
	if herr == nil {
		herr = ctx.Err() // a cancelled migration aborts up to the commit
	}
	if herr != nil {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), rollbackTimeout)
		_ = dproc.Stop(sctx)
		cancel()
		return fail(hypervisor.ErrMigrationFailed, herr)
	}

	// Commit: the destination runs the VM, the source forgets it.
	dst.finishIncoming(vmUUID, dproc, pass)
	committed = true
	h.finishOutgoing(ctx, d, time.Since(t0))
	h.released(vmUUID)
	log.WithField("took", time.Since(t0)).Info("migrated")
	return nil
}

func targetName(t hypervisor.Target) string {
	if t.Name != "" {
		return t.Name
	}
	return t.URI
}

func (h *Host) countFailure() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.stats.MigrationsFailed++
}

// prepareIncoming reserves the VM on the destination (paused, job
// "migration in"), reads its secret and makes a fresh state directory.
func (h *Host) prepareIncoming(vmUUID, name string) (pass []byte, stateDir string, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil, "", fmt.Errorf("%w: %s is closed", hypervisor.ErrUnreachable, h.name)
	}
	if _, ok := h.domains[vmUUID]; ok {
		return nil, "", fmt.Errorf("%w: domain %s on %s", hypervisor.ErrAlreadyExists, vmUUID, h.name)
	}
	if pass, err = h.secretLocked(vmUUID); err != nil {
		return nil, "", err
	}
	vmDir := filepath.Join(h.dir, "vms", vmUUID)
	stateDir = filepath.Join(vmDir, "tpm2")
	// A leftover of an earlier failed attempt has no domain: replace it.
	err = os.RemoveAll(vmDir)
	if err == nil {
		err = os.MkdirAll(stateDir, 0o700)
	}
	if err != nil {
		clear(pass)
		return nil, "", fmt.Errorf("%w: preparing %s: %w", hypervisor.ErrMigrationFailed, stateDir, err)
	}
	h.domains[vmUUID] = &domain{uuid: vmUUID, name: name, stateDir: stateDir, job: jobIncoming}
	return pass, stateDir, nil
}

// incomingHooks runs the MigrateBegin and PrepareBegin hooks, if any, as
// libvirt runs "migrate begin" and then "prepare begin" on a destination.
func (h *Host) incomingHooks(ctx context.Context, vmUUID, name string) error {
	h.mu.Lock()
	hooks := []func(context.Context, string, string) error{h.MigrateBegin, h.PrepareBegin}
	h.mu.Unlock()
	for _, hook := range hooks {
		if hook == nil {
			continue
		}
		if err := hook(ctx, vmUUID, name); err != nil {
			return fmt.Errorf("%w: Hook script execution failed on %s: %w", hypervisor.ErrHookRefused, h.name, err)
		}
	}
	return nil
}

// released runs the Released hook, if any.
func (h *Host) released(vmUUID string) {
	h.mu.Lock()
	hook := h.Released
	h.mu.Unlock()
	if hook != nil {
		hook(vmUUID)
	}
}

// MigratingOut reports whether the VM's current job is an outgoing
// migration (migrate.MigrationJobs).
func (h *Host) MigratingOut(ctx context.Context, vmUUID string) (bool, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, ok := h.domains[vmUUID]
	return ok && d.job == jobOutgoing, nil
}

// OutgoingJob reports the VM's outgoing migration job: when it started and
// the destination host (migrate.OutgoingJobs).
func (h *Host) OutgoingJob(ctx context.Context, vmUUID string) (hypervisor.OutgoingJob, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, ok := h.domains[vmUUID]
	if !ok || d.job != jobOutgoing {
		return hypervisor.OutgoingJob{}, nil
	}
	j := hypervisor.OutgoingJob{Active: true, Started: d.jobStarted, Dest: d.jobDest}
	if h.JobDestUnknown {
		j.Dest = ""
	}
	return j, nil
}

// abortIncoming removes the reserved domain and its state.
func (h *Host) abortIncoming(vmUUID, stateDir string) {
	h.mu.Lock()
	if d, ok := h.domains[vmUUID]; ok && d.job == jobIncoming {
		delete(h.domains, vmUUID)
	}
	h.mu.Unlock()
	if err := h.removeState(vmUUID, stateDir); err != nil {
		h.log.WithError(err).Warn("aborted incoming migration left state behind")
	}
	h.released(vmUUID)
}

// finishIncoming makes the reserved domain a running, persistent one.
func (h *Host) finishIncoming(vmUUID string, proc *swtpm.Process, pass []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.domains[vmUUID]
	d.proc, d.pass, d.job = proc, slices.Clone(pass), jobNone
	h.stats.MigrationsIn++
}

// finishOutgoing stops the source swtpm, undefines the domain and removes
// its state.
func (h *Host) finishOutgoing(ctx context.Context, d *domain, took time.Duration) {
	h.mu.Lock()
	delete(h.domains, d.uuid)
	proc := d.proc
	clear(d.pass)
	d.proc, d.pass = nil, nil
	h.stats.MigrationsOut++
	h.stats.LastMigration = took
	h.mu.Unlock()
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), rollbackTimeout)
	defer cancel()
	if err := proc.Stop(sctx); err != nil {
		h.log.WithError(err).Warn("stopping the migrated-out swtpm")
	}
	if err := h.removeState(d.uuid, d.stateDir); err != nil {
		h.log.WithError(err).Warn("migrated-out vTPM state left behind")
	}
}

// resume restarts the source vTPM after a failed migration. After
// ExportState the swtpm runs but its TPM is stopped, and its state
// directory holds only the permanent state (no volatile state is written
// on CMD_STOP): a plain re-Init, or a new swtpm on the directory, would
// come up like after a reboot, with PCRs reset, so PCR-bound seals would
// no longer unseal. The exported blobs are therefore imported again, into
// the stopped swtpm, or, if that fails, into a new swtpm on the same
// directory with the passphrase the VM was started with.
func (h *Host) resume(ctx context.Context, d *domain, st swtpm.State) error {
	h.mu.Lock()
	proc, pass, restart := d.proc, d.pass, h.resumeByRestart
	h.mu.Unlock()
	var err error
	if !restart {
		if err = swtpm.ImportState(ctx, proc, st); err == nil {
			err = proc.Init(ctx)
		}
		if err == nil {
			h.log.WithField("vm", d.uuid).Info("source vTPM resumed")
			return nil
		}
		h.log.WithField("vm", d.uuid).WithError(err).Warn("resuming the stopped swtpm failed; restarting it")
	}
	_ = proc.Stop(ctx)
	np, err := h.startVTPM(ctx, d.uuid, d.stateDir, pass, &st)
	h.mu.Lock()
	defer h.mu.Unlock()
	if err != nil {
		clear(d.pass)
		d.proc, d.pass = nil, nil // the VM is shut off: nothing is running
		return fmt.Errorf("restarting the source vTPM: %w", err)
	}
	d.proc = np
	h.log.WithField("vm", d.uuid).Info("source vTPM resumed in a new swtpm")
	return nil
}
