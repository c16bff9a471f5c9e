package fake

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
)

var _ hypervisor.Hypervisor = (*Host)(nil)

// Host is one fake hypervisor host. It implements hypervisor.Hypervisor.
type Host struct {
	// FailNextMigrate, when set, makes the next Migrate from this host fail
	// with it (wrapped) before anything happens; it is then cleared.
	FailNextMigrate error
	// FailDefineSecret, while set, makes DefineSecret fail with it (wrapped).
	FailDefineSecret error
	// BeforeMigrateCommit, when set, runs on the source after the vTPM
	// state was copied and the destination vTPM is up, just before the
	// migration commits. An error aborts the migration like a late libvirt
	// failure: the destination is cleaned up and the VM resumes here.
	BeforeMigrateCommit func() error
	// BeforeStartCommit, when set, runs in StartDomain once the vTPM is
	// up, just before the domain counts as running (tests: a power cut
	// in that window, PowerCycle).
	BeforeStartCommit func()
	// MigrateBegin, when set, runs on this host as the destination of an
	// incoming migration before its secret is read, like libvirt's qemu
	// hook "migrate begin" (vtpmm's hook mode pulls the key then). An error
	// fails the migration at once (hypervisor.ErrHookRefused); the VM stays
	// on the source.
	MigrateBegin func(ctx context.Context, vmUUID, name string) error
	// PrepareBegin, when set, runs before a domain's vTPM starts here (a
	// start, or an incoming migration after MigrateBegin), before the
	// secret is read, like libvirt's qemu hook "prepare begin". An error
	// fails the start (hypervisor.ErrHookRefused).
	PrepareBegin func(ctx context.Context, vmUUID, name string) error
	// Released, when set, runs after a domain let go of its resources on
	// this host (an outgoing migration completed, or an incoming one
	// failed), like libvirt's qemu hook "release end". No lock is held.
	Released func(vmUUID string)
	// JobDestUnknown makes OutgoingJob report no destination, as libvirt,
	// which cannot tell where a running migration goes.
	JobDestUnknown bool

	name string
	dir  string
	log  logrus.FieldLogger
	net  *Network

	mu      sync.Mutex
	epoch   uint64 // PowerCycle's count: a start begun before one fails
	secrets map[string][]byte
	domains map[string]*domain
	stats   Stats
	closed  bool
	free    uint64 // free memory it reports (memory.go; 0: DefaultFreeMemory)
	// resumeByRestart makes a failed outgoing migration resume the source
	// vTPM in a new swtpm process instead of the stopped one (tests).
	resumeByRestart bool
}

// Stats counts a host's migrations.
type Stats struct {
	MigrationsOut    int           // successful outgoing migrations
	MigrationsIn     int           // successful incoming migrations
	MigrationsFailed int           // failed outgoing migrations
	LastMigration    time.Duration // duration of the last successful outgoing migration
}

// job is what a domain is busy with.
type job string

const (
	jobNone     job = ""
	jobStart    job = "start"
	jobDestroy  job = "destroy"
	jobUndefine job = "undefine"
	jobOutgoing job = "migration out"
	jobIncoming job = "migration in"
)

type domain struct {
	uuid, name string
	stateDir   string
	proc       *swtpm.Process // nil when shut off
	pass       []byte         // the passphrase proc runs with (swtpm holds it too)
	job        job
	paused     bool
	// jobStarted and jobDest describe the current outgoing migration job
	// (OutgoingJob).
	jobStarted time.Time
	jobDest    string
	// jobProcessed and jobTotal are its bytes (MigrationBytes).
	jobProcessed, jobTotal uint64
}

func (d *domain) state() hypervisor.State {
	switch {
	case d.job == jobIncoming || d.paused:
		return hypervisor.StatePaused
	case d.proc != nil:
		return hypervisor.StateRunning
	}
	return hypervisor.StateShutoff
}

// Name is the host's name.
func (h *Host) Name() string { return h.name }

// Dir is the host's directory (HostConfig.Dir, absolute).
func (h *Host) Dir() string { return h.dir }

// Target is the migration target that names this host.
func (h *Host) Target() hypervisor.Target {
	return hypervisor.Target{Name: h.name, URI: URIScheme + h.name}
}

// Stats returns the host's migration counters.
func (h *Host) Stats() Stats {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.stats
}

// DefineSecret defines or replaces a VM's vTPM secret, in memory only.
func (h *Host) DefineSecret(ctx context.Context, vmUUID string, value []byte) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("define secret %s on %s: %w", vmUUID, h.name, err)
	}
	if vtpm.CheckVMID(vmUUID) != nil || len(value) == 0 {
		return fmt.Errorf("define secret %s on %s: %w: canonical UUID and a non-empty value required", vmUUID, h.name, ErrBadConfig)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.FailDefineSecret != nil {
		return fmt.Errorf("define secret %s on %s: %w", vmUUID, h.name, h.FailDefineSecret)
	}
	if h.closed {
		return fmt.Errorf("define secret %s on %s: %w", vmUUID, h.name, ErrClosed)
	}
	clear(h.secrets[vmUUID])
	h.secrets[vmUUID] = slices.Clone(value)
	return nil
}

// UndefineSecret removes a VM's vTPM secret; a missing one is not an error.
// Running vTPMs are not affected.
func (h *Host) UndefineSecret(ctx context.Context, vmUUID string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("undefine secret %s on %s: %w", vmUUID, h.name, err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	clear(h.secrets[vmUUID])
	delete(h.secrets, vmUUID)
	return nil
}

// HasSecret reports whether a secret is defined for the VM.
func (h *Host) HasSecret(ctx context.Context, vmUUID string) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, fmt.Errorf("has secret %s on %s: %w", vmUUID, h.name, err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	_, ok := h.secrets[vmUUID]
	return ok, nil
}

// secretLocked returns a copy of a VM's secret, or ErrSecretMissing with
// libvirt's message. h.mu must be held.
func (h *Host) secretLocked(vmUUID string) ([]byte, error) {
	s, ok := h.secrets[vmUUID]
	if !ok {
		return nil, fmt.Errorf("%w: Secret not found: no secret with matching uuid '%s'", hypervisor.ErrSecretMissing, vmUUID)
	}
	return slices.Clone(s), nil
}

// Domain reports a VM's state here (StateAbsent when it is not defined).
func (h *Host) Domain(ctx context.Context, vmUUID string) (hypervisor.Domain, error) {
	if err := ctx.Err(); err != nil {
		return hypervisor.Domain{}, fmt.Errorf("domain %s on %s: %w", vmUUID, h.name, err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	d, ok := h.domains[vmUUID]
	if !ok {
		return hypervisor.Domain{UUID: vmUUID, State: hypervisor.StateAbsent}, nil
	}
	return hypervisor.Domain{UUID: d.uuid, Name: d.name, State: d.state()}, nil
}

// Domains lists the host's VMs (all have a vTPM), sorted by name.
func (h *Host) Domains(ctx context.Context) ([]hypervisor.Domain, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("domains on %s: %w", h.name, err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]hypervisor.Domain, 0, len(h.domains))
	for _, d := range h.domains {
		out = append(out, hypervisor.Domain{UUID: d.uuid, Name: d.name, State: d.state()})
	}
	slices.SortFunc(out, func(a, b hypervisor.Domain) int {
		return cmp.Or(cmp.Compare(a.Name, b.Name), cmp.Compare(a.UUID, b.UUID))
	})
	return out, nil
}

// DefineVTPMDomain defines a persistent, shut-off VM whose encrypted swtpm
// state already exists in stateDir (made by swtpm.Setup with the passphrase
// that the VM's secret will hold).
func (h *Host) DefineVTPMDomain(ctx context.Context, d hypervisor.Domain, stateDir string) error {
	op := fmt.Sprintf("define domain %s (%s) on %s", d.UUID, d.Name, h.name)
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if vtpm.CheckVMID(d.UUID) != nil || d.Name == "" {
		return fmt.Errorf("%s: %w: canonical UUID and a name required", op, ErrBadConfig)
	}
	abs, err := filepath.Abs(stateDir)
	if err != nil || stateDir == "" || strings.ContainsAny(abs, ",=") {
		return fmt.Errorf("%s: %w: state dir %q must be set and contain no ',' or '='", op, ErrBadConfig, stateDir)
	}
	if _, err := os.Stat(filepath.Join(abs, "tpm2-00.permall")); err != nil {
		return fmt.Errorf("%s: %w: no vTPM state in %s (run swtpm.Setup first): %v", op, ErrBadConfig, abs, err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return fmt.Errorf("%s: %w", op, ErrClosed)
	}
	if _, ok := h.domains[d.UUID]; ok {
		return fmt.Errorf("%s: %w", op, hypervisor.ErrAlreadyExists)
	}
	h.domains[d.UUID] = &domain{uuid: d.UUID, name: d.Name, stateDir: abs}
	return nil
}

// claimLocked marks a domain busy with j; the caller must release it.
// h.mu must be held.
func (h *Host) claimLocked(vmUUID string, j job) (*domain, error) {
	d, ok := h.domains[vmUUID]
	switch {
	case h.closed:
		return nil, ErrClosed
	case !ok:
		return nil, hypervisor.ErrNoDomain
	case d.job == jobOutgoing:
		return nil, fmt.Errorf("%w: %w: domain is already being migrated", hypervisor.ErrMigrationFailed, ErrBusy)
	case d.job != jobNone:
		return nil, fmt.Errorf("%w (job %q)", ErrBusy, d.job)
	}
	d.job = j
	d.jobStarted, d.jobDest = time.Now(), ""
	d.jobProcessed, d.jobTotal = 0, 0
	return d, nil
}

func (h *Host) release(d *domain) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d.job = jobNone
	d.paused = false
}

// StartDomain cold-starts a VM: it reads the VM's secret now, starts swtpm
// on the domain's state with it and initialises the vTPM.
func (h *Host) StartDomain(ctx context.Context, vmUUID string) error {
	op := fmt.Sprintf("start domain %s on %s", vmUUID, h.name)
	h.mu.Lock()
	epoch := h.epoch
	d, err := h.claimLocked(vmUUID, jobStart)
	if err == nil && d.proc != nil {
		d.job, err = jobNone, ErrDomainActive
	}
	hook := h.PrepareBegin
	h.mu.Unlock()
	if err == nil && hook != nil {
		// libvirt runs the hook with the job held: the domain stays claimed.
		if herr := hook(ctx, vmUUID, d.name); herr != nil {
			h.release(d)
			return fmt.Errorf("%s: %w: Hook script execution failed on %s: %w", op, hypervisor.ErrHookRefused, h.name, herr)
		}
	}
	h.mu.Lock()
	var pass []byte
	if err == nil {
		if pass, err = h.secretLocked(vmUUID); err != nil {
			d.job = jobNone
		}
	}
	h.mu.Unlock()
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	defer h.release(d)
	proc, err := h.startVTPM(ctx, vmUUID, d.stateDir, pass, nil)
	if err != nil {
		clear(pass)
		return fmt.Errorf("%s: %w", op, classifyStart(err))
	}
	if h.BeforeStartCommit != nil {
		h.BeforeStartCommit()
	}
	h.mu.Lock()
	if h.epoch != epoch {
		// The host lost power while the VM was starting: it is not
		// running after the boot.
		h.mu.Unlock()
		clear(pass)
		_ = proc.Stop(ctx)
		return fmt.Errorf("%s: %w", op, ErrPowerCycled)
	}
	d.proc, d.pass = proc, pass
	h.mu.Unlock()
	h.log.WithField("vm", vmUUID).Info("domain started")
	return nil
}

// classifyStart maps a wrong passphrase onto ErrSecretMismatch.
func classifyStart(err error) error {
	if errors.Is(err, swtpm.ErrWrongPassphrase) {
		return fmt.Errorf("%w: %w", hypervisor.ErrSecretMismatch, err)
	}
	return err
}

// DestroyDomain stops a running VM (its swtpm stops; the state stays).
func (h *Host) DestroyDomain(ctx context.Context, vmUUID string) error {
	op := fmt.Sprintf("destroy domain %s on %s", vmUUID, h.name)
	h.mu.Lock()
	d, err := h.claimLocked(vmUUID, jobDestroy)
	if err == nil && d.proc == nil {
		d.job, err = jobNone, hypervisor.ErrNotRunning
	}
	h.mu.Unlock()
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	err = d.proc.Stop(ctx)
	h.mu.Lock()
	clear(d.pass)
	d.proc, d.pass = nil, nil
	h.mu.Unlock()
	h.release(d)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	// libvirt runs the qemu hook's "release end" after every stop, not
	// only after a migration, once the domain let go of its resources.
	h.released(vmUUID)
	return nil
}

// UndefineDomain removes a shut-off VM and, like libvirt without
// --keep-tpm, its vTPM state directory.
func (h *Host) UndefineDomain(ctx context.Context, vmUUID string) error {
	op := fmt.Sprintf("undefine domain %s on %s", vmUUID, h.name)
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	h.mu.Lock()
	d, err := h.claimLocked(vmUUID, jobUndefine)
	if err == nil && d.proc != nil {
		d.job, err = jobNone, ErrDomainActive
	}
	if err == nil {
		delete(h.domains, vmUUID)
	}
	h.mu.Unlock()
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if err := h.removeState(vmUUID, d.stateDir); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return nil
}

// VTPMStateDir returns the directory of a VM's vTPM state here (a key
// rotation re-encrypts it while the VM is shut off).
func (h *Host) VTPMStateDir(ctx context.Context, vmUUID string) (string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, ok := h.domains[vmUUID]
	if !ok {
		return "", fmt.Errorf("vTPM state of %s on %s: %w", vmUUID, h.name, hypervisor.ErrNoDomain)
	}
	return d.stateDir, nil
}

// VTPMURI returns the data URI of a running VM's vTPM (for vtpm.Open), so
// a test "guest" can use it. swtpm serves one connection at a time.
func (h *Host) VTPMURI(vmUUID string) (string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, ok := h.domains[vmUUID]
	switch {
	case !ok:
		return "", fmt.Errorf("vTPM of %s on %s: %w", vmUUID, h.name, hypervisor.ErrNoDomain)
	case d.proc == nil || d.state() != hypervisor.StateRunning:
		return "", fmt.Errorf("vTPM of %s on %s: %w", vmUUID, h.name, hypervisor.ErrNotRunning)
	}
	return d.proc.DataURI(), nil
}

// Close stops every swtpm on the host; domains stay defined, shut off.
// Later calls that would start a vTPM fail with ErrClosed.
func (h *Host) Close(ctx context.Context) error {
	h.mu.Lock()
	h.closed = true
	var procs []*swtpm.Process
	for _, d := range h.domains {
		if d.proc != nil {
			procs = append(procs, d.proc)
			clear(d.pass)
			d.proc, d.pass = nil, nil
		}
	}
	h.mu.Unlock()
	var errs []error
	for _, p := range procs {
		errs = append(errs, p.Stop(ctx))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close fake host %s: %w", h.name, err)
	}
	return nil
}

// startVTPM starts swtpm on stateDir with pass, imports st when given and
// initialises the TPM. On error no process is left running.
func (h *Host) startVTPM(ctx context.Context, vmUUID, stateDir string, pass []byte, st *swtpm.State) (*swtpm.Process, error) {
	logFile := filepath.Join(h.dir, "log", vmUUID+"-swtpm.log")
	// A fresh log per process: swtpm errors are classified from its tail.
	_ = os.Rename(logFile, logFile+".1")
	p, err := swtpm.Start(ctx, swtpm.ProcessConfig{StateDir: stateDir, Passphrase: pass, LogFile: logFile,
		Log: h.log.WithField("vm", vmUUID)})
	if err != nil {
		return nil, err
	}
	if st != nil {
		err = swtpm.ImportState(ctx, p, *st)
	}
	if err == nil {
		err = p.Init(ctx)
	}
	if err != nil {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_ = p.Stop(sctx)
		return nil, err
	}
	return p, nil
}

// removeState removes a vTPM state directory, and its per-VM parent when
// the host made it (Dir/vms/UUID).
func (h *Host) removeState(vmUUID, stateDir string) error {
	dir := stateDir
	if own := filepath.Join(h.dir, "vms", vmUUID); filepath.Dir(stateDir) == own {
		dir = own
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove vTPM state: %w", err)
	}
	return nil
}
