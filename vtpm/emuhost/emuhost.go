package emuhost

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
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
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
)

// DefaultPCRBanks returns the PCR banks an emulated host allocates unless
// Config.PCRBanks says otherwise: the banks real firmware logs use.
func DefaultPCRBanks() []string { return []string{"sha1", "sha256", "sha384"} }

// Config describes one emulated host TPM.
type Config struct {
	// Dir holds everything the host owns (config, CA, state, logs). It is
	// created if missing. Starting again on the same Dir reuses the state.
	Dir string
	// Name names the host; it becomes the vmid and platform model of the
	// certificates.
	Name string
	// Log receives progress messages; nil means no logging.
	Log logrus.FieldLogger
	// PCRBanks to allocate when the TPM is manufactured (default
	// DefaultPCRBanks()).
	PCRBanks []string
}

// Host is a running (or stopped) emulated host TPM.
type Host struct {
	cfg      Config
	log      logrus.FieldLogger
	stateDir string
	caDir    string
	sockDir  string // may be a short directory under /tmp (unix path limit)
	ownSock  bool   // sockDir was created by us and is removed by Stop
	dataSock string
	ctrlSock string

	mu   sync.Mutex
	proc *process
	// ProvisionTime is how long swtpm_setup took (0 when the state existed).
	provisionTime time.Duration
}

type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // valid after done is closed
}

// Available reports whether swtpm and its setup tools are installed.
func Available() error {
	var missing []string
	for _, b := range []string{"swtpm", "swtpm_setup", "swtpm_localca", "swtpm_cert"} {
		if _, err := exec.LookPath(b); err != nil {
			missing = append(missing, b)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("emuhost: %w: missing %s", ErrNotInstalled, strings.Join(missing, ", "))
	}
	return nil
}

// maxSockPath keeps unix socket paths under the 108-byte sun_path limit.
const maxSockPath = 100

// Start manufactures the host's TPM (unless Dir already holds its state),
// starts swtpm and waits until it answers TPM commands.
func Start(ctx context.Context, cfg Config) (*Host, error) {
	if err := Available(); err != nil {
		return nil, err
	}
	if cfg.Dir == "" || cfg.Name == "" {
		return nil, fmt.Errorf("emuhost start: %w: Dir and Name are required", ErrBadConfig)
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("emuhost start: %w: %v", ErrBadConfig, err)
	}
	if strings.ContainsAny(dir, ",=") {
		// swtpm's option syntax (dir=...,mode=...) cannot quote these.
		return nil, fmt.Errorf("emuhost start: %w: Dir %q contains ',' or '=', which swtpm cannot parse", ErrBadConfig, dir)
	}
	cfg.Dir = dir
	if len(cfg.PCRBanks) == 0 {
		cfg.PCRBanks = DefaultPCRBanks()
	}
	log := cfg.Log
	if log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		log = l
	}
	h := &Host{
		cfg:      cfg,
		log:      log.WithField("emuhost", cfg.Name),
		stateDir: filepath.Join(dir, "state"),
		caDir:    filepath.Join(dir, "ca"),
		sockDir:  dir,
	}
	for _, d := range []string{h.stateDir, h.caDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("emuhost start: %w", err)
		}
	}
	if len(filepath.Join(dir, "swtpm-ctrl.sock")) > maxSockPath {
		s, err := os.MkdirTemp("/tmp", "emuh-")
		if err != nil {
			return nil, fmt.Errorf("emuhost start: socket dir: %w", err)
		}
		h.sockDir, h.ownSock = s, true
	}
	h.dataSock = filepath.Join(h.sockDir, "swtpm.sock")
	h.ctrlSock = filepath.Join(h.sockDir, "swtpm-ctrl.sock")

	if err := h.provision(ctx); err != nil {
		h.cleanupSockDir()
		return nil, err
	}
	if err := h.start(ctx); err != nil {
		h.cleanupSockDir()
		return nil, err
	}
	return h, nil
}

// URI is the TPM URI for vtpm.Open (swtpm+unix://...). It stays the same
// across Restart.
func (h *Host) URI() string { return "swtpm+unix://" + h.dataSock }

// CtrlSocket is the path of swtpm's control channel (swtpm_ioctl --unix).
func (h *Host) CtrlSocket() string { return h.ctrlSock }

// Dir is the host's directory.
func (h *Host) Dir() string { return h.cfg.Dir }

// Name is the host's name.
func (h *Host) Name() string { return h.cfg.Name }

// PCRBanks are the PCR banks allocated in this host's TPM.
func (h *Host) PCRBanks() []string { return append([]string(nil), h.cfg.PCRBanks...) }

// ProvisionTime is how long manufacturing (swtpm_setup incl. CA creation)
// took in Start; zero if the state already existed.
func (h *Host) ProvisionTime() time.Duration { return h.provisionTime }

// RootCAPath is the path of the local CA's self-signed root certificate.
func (h *Host) RootCAPath() string { return filepath.Join(h.caDir, "swtpm-localca-rootca-cert.pem") }

// IntermediateCAPath is the path of the local CA's issuing certificate, which
// signed the EK and platform certificates (it is signed by the root).
func (h *Host) IntermediateCAPath() string { return filepath.Join(h.caDir, "issuercert.pem") }

// CACertPEM returns the host's CA certificates as PEM: the root followed by
// the intermediate that issued the EK certificates.
func (h *Host) CACertPEM() ([]byte, error) {
	var out []byte
	for _, p := range []string{h.RootCAPath(), h.IntermediateCAPath()} {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("emuhost CA certificates: %w", err)
		}
		out = append(out, b...)
	}
	return out, nil
}

// Running reports whether the swtpm process is alive.
func (h *Host) Running() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.proc == nil {
		return false
	}
	select {
	case <-h.proc.done:
		return false
	default:
		return true
	}
}

// Stop shuts swtpm down through its control channel (CMD_SHUTDOWN) and kills
// it if it has not exited when ctx ends or after 5 s. Stop is idempotent.
// Open connections break; the state stays in Dir.
func (h *Host) Stop(ctx context.Context) error {
	err := h.stop(ctx)
	h.cleanupSockDir()
	return err
}

// Restart stops and starts swtpm on the same state and the same URI, like a
// reboot: PCRs are reset, persistent objects and NV survive. Connections
// opened before must be reopened.
func (h *Host) Restart(ctx context.Context) error {
	if err := h.stop(ctx); err != nil {
		return fmt.Errorf("emuhost restart: %w", err)
	}
	return h.start(ctx)
}

func (h *Host) cleanupSockDir() {
	if h.ownSock {
		_ = os.RemoveAll(h.sockDir)
	}
}

func (h *Host) stop(ctx context.Context) error {
	h.mu.Lock()
	p := h.proc
	h.proc = nil
	h.mu.Unlock()
	if p == nil {
		return nil
	}
	select {
	case <-p.done:
		return nil
	default:
	}
	if err := ctrlCommand(ctx, h.ctrlSock, cmdShutdown); err != nil {
		h.log.WithError(err).Warn("graceful swtpm shutdown failed; killing it")
	}
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case <-p.done:
		h.log.Debug("swtpm stopped")
		return nil
	case <-ctx.Done():
	case <-t.C:
	}
	_ = p.cmd.Process.Kill()
	<-p.done
	h.log.Warn("swtpm killed")
	return nil
}

func (h *Host) start(ctx context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.proc != nil {
		return nil
	}
	for _, s := range []string{h.dataSock, h.ctrlSock} {
		_ = os.Remove(s)
	}
	args := []string{"socket", "--tpm2",
		"--server", "type=unixio,path=" + h.dataSock,
		"--ctrl", "type=unixio,path=" + h.ctrlSock,
		"--tpmstate", "dir=" + h.stateDir,
		"--flags", "not-need-init,startup-clear",
		"--log", "file=" + filepath.Join(h.cfg.Dir, "swtpm.log") + ",level=2",
	}
	var stderr bytes.Buffer
	cmd := exec.Command("swtpm", args...)
	cmd.Stdout = &stderr
	cmd.Stderr = &stderr
	// The TPM dies with the test binary / agent that started it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("emuhost start: %w: %v", ErrStart, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	h.log.WithField("cmd", "swtpm "+strings.Join(args, " ")).Debug("swtpm started")

	if err := waitReady(ctx, h.dataSock, p); err != nil {
		_ = cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("emuhost start %s: %w: %v (swtpm output: %s; log: %s)", h.cfg.Name, ErrStart, err,
			strings.TrimSpace(stderr.String()), swtpm.LogTail(filepath.Join(h.cfg.Dir, "swtpm.log")))
	}
	h.proc = p
	return nil
}

// waitReady polls the data socket until swtpm answers a TPM command, the
// process exits or ctx ends.
func waitReady(ctx context.Context, sock string, p *process) error {
	delay := 2 * time.Millisecond
	var lastErr error
	for {
		select {
		case <-p.done:
			return fmt.Errorf("swtpm exited: %v", p.err)
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), lastErr)
		default:
		}
		if lastErr = probe(ctx, sock); lastErr == nil {
			return nil
		}
		select {
		case <-time.After(delay):
		case <-p.done:
		case <-ctx.Done():
		}
		if delay < 50*time.Millisecond {
			delay *= 2
		}
	}
}

func probe(ctx context.Context, sock string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", sock)
	if err != nil {
		return err
	}
	tpm := vtpm.NewStreamTPM(c)
	defer tpm.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	_, err = tpm2.GetRandom{BytesRequested: 1}.Execute(tpm)
	return err
}
