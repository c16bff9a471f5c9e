package swtpm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/vtpm"
)

// ProcessConfig describes one swtpm process for a VM vTPM.
type ProcessConfig struct {
	// StateDir holds the (encrypted) TPM state.
	StateDir string
	// Passphrase decrypts the state and encrypts exported state blobs. It is
	// given to swtpm twice, as --key pwdfd= and --migration-key pwdfd=, each
	// on its own inherited pipe, like libvirt does.
	Passphrase []byte
	// MigrationPassphrase, when set, is given as --migration-key instead of
	// Passphrase: state blobs leave and enter swtpm under it while the state
	// at rest stays under Passphrase (a rekey exports under the new key).
	MigrationPassphrase []byte
	// SocketDir receives swtpm.sock and swtpm-ctrl.sock. Empty: a fresh
	// short directory under /tmp, removed by Stop. Unix socket paths must
	// stay under 108 bytes.
	SocketDir string
	// LogFile is swtpm's log (default: StateDir + "-swtpm.log").
	LogFile string
	// Log receives progress messages; nil means no logging.
	Log logrus.FieldLogger
}

// Process is a running swtpm for one VM vTPM. It is started without
// not-need-init, like QEMU runs it: the TPM answers commands only after
// Init (CMD_INIT), and state blobs can be set before that.
type Process struct {
	cfg      ProcessConfig
	log      logrus.FieldLogger
	sockDir  string
	ownSock  bool
	dataSock string
	ctrl     *CtrlClient
	cmd      *exec.Cmd
	done     chan struct{}
	waitErr  error
	output   *syncBuffer
	stopOnce sync.Once
	stopErr  error
}

// maxSockPath keeps unix socket paths under the 108-byte sun_path limit.
const maxSockPath = 100

// Start starts swtpm on cfg.StateDir and waits until its control channel
// answers. The TPM is not initialised yet: call Init (or ImportState, then
// Init).
func Start(ctx context.Context, cfg ProcessConfig) (*Process, error) {
	if err := available(); err != nil {
		return nil, err
	}
	if cfg.StateDir == "" || len(cfg.Passphrase) == 0 {
		return nil, fmt.Errorf("swtpm start: %w: StateDir and Passphrase are required", ErrBadConfig)
	}
	stateDir, err := filepath.Abs(cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("swtpm start: %w: %v", ErrBadConfig, err)
	}
	cfg.StateDir = stateDir
	if cfg.LogFile == "" {
		cfg.LogFile = stateDir + "-swtpm.log"
	}
	if err := checkOptPath(stateDir, cfg.SocketDir, cfg.LogFile); err != nil {
		return nil, fmt.Errorf("swtpm start: %w", err)
	}
	p := &Process{cfg: cfg, log: logger(cfg.Log).WithField("vtpm", filepath.Base(stateDir)), sockDir: cfg.SocketDir}
	if p.sockDir == "" {
		if p.sockDir, err = os.MkdirTemp("/tmp", "vtpm-"); err != nil {
			return nil, fmt.Errorf("swtpm start: %w", err)
		}
		p.ownSock = true
	}
	ctrlSock := filepath.Join(p.sockDir, "swtpm-ctrl.sock")
	if len(ctrlSock) > maxSockPath {
		p.cleanup()
		return nil, fmt.Errorf("swtpm start: %w: socket path %q is too long for a unix socket", ErrBadConfig, ctrlSock)
	}
	p.dataSock = filepath.Join(p.sockDir, "swtpm.sock")
	p.ctrl = NewCtrlClient(ctrlSock)
	for _, s := range []string{p.dataSock, ctrlSock} {
		_ = os.Remove(s)
	}

	keyPipe, err := secretPipe(cfg.Passphrase)
	if err != nil {
		p.cleanup()
		return nil, fmt.Errorf("swtpm start: %w", err)
	}
	defer keyPipe.Close()
	migPass := cfg.Passphrase
	if len(cfg.MigrationPassphrase) > 0 {
		migPass = cfg.MigrationPassphrase
	}
	migPipe, err := secretPipe(migPass)
	if err != nil {
		p.cleanup()
		return nil, fmt.Errorf("swtpm start: %w", err)
	}
	defer migPipe.Close()

	args := ProcessArgs(stateDir, p.dataSock, ctrlSock, cfg.LogFile, 3, 4)
	p.output = &syncBuffer{}
	p.cmd = exec.Command("swtpm", args...)
	p.cmd.ExtraFiles = []*os.File{keyPipe, migPipe} // fds 3 and 4
	p.cmd.Stdout, p.cmd.Stderr = p.output, p.output
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		p.cleanup()
		return nil, fmt.Errorf("swtpm start: %w: %v", ErrStart, err)
	}
	p.done = make(chan struct{})
	go func() { p.waitErr = p.cmd.Wait(); close(p.done) }()
	p.log.WithField("cmd", "swtpm "+strings.Join(args, " ")).Debug("swtpm started")

	if err := p.waitCtrl(ctx); err != nil {
		_ = p.cmd.Process.Kill()
		<-p.done
		p.cleanup()
		if wrongKeyLog(LogTail(cfg.LogFile)) {
			return nil, fmt.Errorf("swtpm start: %w: %v (%s)", ErrWrongPassphrase, err, p.diagnostics())
		}
		return nil, fmt.Errorf("swtpm start: %w: %v (%s)", ErrStart, err, p.diagnostics())
	}
	return p, nil
}

// ProcessArgs is the swtpm command line Start runs. keyFD and migFD are the
// passphrase pipes' fd numbers in the child.
func ProcessArgs(stateDir, dataSock, ctrlSock, logFile string, keyFD, migFD int) []string {
	return []string{"socket", "--tpm2",
		"--tpmstate", "dir=" + stateDir + ",mode=0600",
		"--server", "type=unixio,path=" + dataSock + ",mode=0600",
		"--ctrl", "type=unixio,path=" + ctrlSock + ",mode=0600",
		"--key", fmt.Sprintf("pwdfd=%d,mode=aes-256-cbc", keyFD),
		"--migration-key", fmt.Sprintf("pwdfd=%d,mode=aes-256-cbc", migFD),
		"--log", "file=" + logFile + ",level=1",
	}
}

func (p *Process) waitCtrl(ctx context.Context) error {
	delay := 2 * time.Millisecond
	for {
		select {
		case <-p.done:
			return fmt.Errorf("swtpm exited: %v", p.waitErr)
		default:
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := p.ctrl.GetCapability(cctx)
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		case <-p.done:
		case <-time.After(delay):
		}
		delay = min(2*delay, 50*time.Millisecond)
	}
}

// DataURI is the TPM URI for vtpm.Open (swtpm+unix://...).
func (p *Process) DataURI() string { return "swtpm+unix://" + p.dataSock }

// CtrlSocket is the control socket's path.
func (p *Process) CtrlSocket() string { return p.ctrl.Path }

// Ctrl returns the control-channel client.
func (p *Process) Ctrl() *CtrlClient { return p.ctrl }

// Pid is swtpm's process id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Init initialises the TPM like QEMU and firmware do: CMD_INIT (swtpm
// decrypts and loads the state, or the blobs set by ImportState), then
// TPM2_Startup(CLEAR) on the data channel. A TPM that resumed a volatile
// state (after ImportState) is already started; its TPM_RC_INITIALIZE is
// expected. A wrong passphrase returns an error matching ErrWrongPassphrase.
func (p *Process) Init(ctx context.Context) error {
	if err := p.ctrl.Init(ctx, 0); err != nil {
		if errors.Is(err, ErrWrongPassphrase) || wrongKeyLog(LogTail(p.cfg.LogFile)) {
			return fmt.Errorf("swtpm init %s: %w: %v", p.cfg.StateDir, ErrWrongPassphrase, err)
		}
		return fmt.Errorf("swtpm init %s: %w (%s)", p.cfg.StateDir, err, p.diagnostics())
	}
	tpm, err := vtpm.Open(ctx, p.DataURI())
	if err != nil {
		return fmt.Errorf("swtpm init %s: %w", p.cfg.StateDir, err)
	}
	defer tpm.Close()
	_, err = tpm2.Startup{StartupType: tpm2.TPMSUClear}.Execute(tpm)
	if err != nil && !errors.Is(err, tpm2.TPMRCInitialize) {
		return fmt.Errorf("swtpm init %s: TPM2_Startup: %w", p.cfg.StateDir, err)
	}
	return nil
}

// wrongKeyLog recognises swtpm's log lines for a state that does not
// decrypt (libtpms rc 33 = TPM_DECRYPT_ERROR after a failed HMAC check).
func wrongKeyLog(log string) bool {
	return strings.Contains(log, "Data integrity is compromised") || strings.Contains(log, "GetDecryptedData rc = 33")
}

// Exited is closed when swtpm has exited.
func (p *Process) Exited() <-chan struct{} { return p.done }

// Stop shuts swtpm down (CMD_SHUTDOWN), waits for it to exit and kills it
// when ctx ends or after 5 s. It is idempotent.
func (p *Process) Stop(ctx context.Context) error {
	p.stopOnce.Do(func() {
		defer p.cleanup()
		select {
		case <-p.done:
			return
		default:
		}
		if err := p.ctrl.Shutdown(ctx); err != nil {
			p.log.WithError(err).Warn("CMD_SHUTDOWN failed; killing swtpm")
		}
		t := time.NewTimer(5 * time.Second)
		defer t.Stop()
		select {
		case <-p.done:
			return
		case <-ctx.Done():
		case <-t.C:
		}
		_ = p.cmd.Process.Kill()
		<-p.done
		p.log.Warn("swtpm killed")
	})
	return p.stopErr
}

func (p *Process) cleanup() {
	if p.ownSock {
		_ = os.RemoveAll(p.sockDir)
	}
}

func (p *Process) diagnostics() string {
	out := ""
	if p.output != nil {
		out = strings.TrimSpace(p.output.String())
	}
	return fmt.Sprintf("swtpm output: %q; log: %q", out, LogTail(p.cfg.LogFile))
}

// syncBuffer collects swtpm's stdout/stderr for error messages.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.b.Len() > 64<<10 {
		return len(p), nil
	}
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func logger(l logrus.FieldLogger) logrus.FieldLogger {
	if l != nil {
		return l
	}
	d := logrus.New()
	d.SetOutput(io.Discard)
	return d
}
