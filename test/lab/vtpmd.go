package lab

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
)

// ErrVtpmd means a host's vtpmd did not come up or did not stop.
var ErrVtpmd = errors.New("lab vtpmd failed")

// WirePort is the port every host's vtpmd serves the agent wire on.
const WirePort = 7450

// Tools are the real vtpmd and vtpmctl binaries, built from this module.
type Tools struct {
	Vtpmd, Vtpmctl string
}

// ModuleRoot finds the directory of vtpmm's go.mod, walking up from the
// working directory (go test runs in the package's directory).
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && bytes.Contains(b, []byte("module github.com/vtpmm/vtpmm\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("%w: no vtpmm go.mod above the working directory", ErrMissing)
		}
		dir = parent
	}
}

// BuildTools builds vtpmd and vtpmctl into dir (go build; the build cache
// makes a second build a link step).
func BuildTools(ctx context.Context, dir string) (Tools, error) {
	root, err := ModuleRoot()
	if err != nil {
		return Tools{}, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Tools{}, err
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+"/", "./cmd/vtpmd", "./cmd/vtpmctl")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return Tools{}, fmt.Errorf("build vtpmd and vtpmctl: %v\n%s", err, out)
	}
	return Tools{Vtpmd: filepath.Join(dir, "vtpmd"), Vtpmctl: filepath.Join(dir, "vtpmctl")}, nil
}

// Result is what a command printed and its exit code.
type Result struct {
	Stdout, Stderr string
	Code           int
}

func (r Result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.Code, r.Stdout, r.Stderr)
}

// run runs a command (bounded by ctx) and returns its output and exit code;
// err is set only when it could not run at all.
func run(ctx context.Context, name string, args ...string) (Result, error) {
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	r := Result{Stdout: out.String(), Stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.Code = ee.ExitCode()
		err = nil
	case err != nil:
		r.Code = -1
	}
	return r, err
}

// Ctl runs vtpmctl with args.
func (tl Tools) Ctl(ctx context.Context, args ...string) (Result, error) {
	return run(ctx, tl.Vtpmctl, args...)
}

// VtpmdConfig is what every host's vtpmd shares: the binaries, the agents'
// PKI (vtpmctl pki init / issue HOST), the attestation policy and the
// directory of trusted EK roots.
type VtpmdConfig struct {
	Tools    Tools
	PKIDir   string
	Policy   string
	RootsDir string
	// Peers maps every host of the fleet to its IP (this host is skipped).
	Peers map[string]string
	// BootLog is this host's event log (sent with its evidence).
	BootLog string
	// EvidenceMaxAge is attestation.evidence_max_age (default 60s).
	EvidenceMaxAge string
}

// Vtpmd is the real vtpmd of one host. It runs in the host's network,
// mount and UTS namespaces (entered with nsenter through the subreaper
// that runs the host's libvirtd), so qemu:///system is the host's own
// libvirtd and the agent wire listens on the host's IP. The admin socket
// and data directory live below the host's directory, which the test
// process sees as well.
type Vtpmd struct {
	Host       *Host
	Tools      Tools
	ConfigPath string
	DataDir    string
	RunDir     string
	Socket     string // admin socket
	LogPath    string // stdout and stderr of every run, appended

	cmd  *exec.Cmd
	done chan struct{}
	// Starts counts the runs started so far.
	Starts int
	// ServingSince is when the current run's admin socket first answered;
	// vtpmd's recovery loop ticks every RecoveryInterval after about then.
	ServingSince time.Time
}

// RecoveryInterval is the period of vtpmd's recovery loop (daemon.RecoveryInterval).
const RecoveryInterval = daemon.RecoveryInterval

// NextRecoveryTick is the first tick of the recovery loop at or after t
// (an estimate: within about 100 ms).
func (v *Vtpmd) NextRecoveryTick(t time.Time) time.Time {
	if v.ServingSince.IsZero() || !v.Running() {
		return time.Time{}
	}
	n := t.Sub(v.ServingSince)/RecoveryInterval + 1
	return v.ServingSince.Add(n * RecoveryInterval)
}

// VtpmdSocket is the admin socket of h's vtpmd (the same path inside the
// host's namespaces and in the test process).
func VtpmdSocket(h *Host) string { return filepath.Join(h.Dir, "vtpmd", "run", "vtpmd.sock") }

// NewVtpmd writes the host's vtpmd configuration and runs 'vtpmd init'
// (vault sealed to the host TPM's current PCRs, AK and migration key).
// It does not start the daemon (Start); it is stopped when the test ends.
func NewVtpmd(ctx context.Context, t T, h *Host, cfg VtpmdConfig) *Vtpmd {
	t.Helper()
	dir := filepath.Join(h.Dir, "vtpmd")
	v := &Vtpmd{Host: h, Tools: cfg.Tools, ConfigPath: filepath.Join(dir, "vtpmd.yaml"),
		DataDir: filepath.Join(dir, "data"), RunDir: filepath.Join(dir, "run"), LogPath: filepath.Join(dir, "vtpmd.log")}
	v.Socket = VtpmdSocket(h)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if cfg.EvidenceMaxAge == "" {
		cfg.EvidenceMaxAge = "60s"
	}
	bootLog, err := filepath.Abs(cfg.BootLog)
	if err != nil {
		t.Fatal(err)
	}
	var peers strings.Builder
	for name, ip := range cfg.Peers {
		if name != h.Name {
			fmt.Fprintf(&peers, "  %s: %s\n", name, net.JoinHostPort(ip, strconv.Itoa(WirePort)))
		}
	}
	conf := fmt.Sprintf(`host_id: %s
data_dir: %s
run_dir: %s
tpm: %s
log_level: debug
listen: %s
admin_socket: %s
hypervisor: qemu:///system
peers:
%stls:
  ca: %s
  cert: %s
  key: %s
attestation:
  policy: %s
  roots: [%s]
  enrollments: %s
  evidence_max_age: %s
event_log: %s
`, h.Name, v.DataDir, v.RunDir, h.Emu.URI(), net.JoinHostPort(h.IP, strconv.Itoa(WirePort)), v.Socket, peers.String(),
		filepath.Join(cfg.PKIDir, "ca.crt"), filepath.Join(cfg.PKIDir, h.Name+".crt"), filepath.Join(cfg.PKIDir, h.Name+".key"),
		cfg.Policy, cfg.RootsDir, filepath.Join(v.DataDir, "enrollments.json"), cfg.EvidenceMaxAge, bootLog)
	if err := os.WriteFile(v.ConfigPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := v.Stop(); err != nil {
			t.Errorf("lab cleanup: %v", err)
		}
		if t.Failed() {
			t.Logf("lab: %s vtpmd log tail:\n%s", h.Name, v.LogTail(4000))
		}
	})
	r, err := v.Run(ctx, "init")
	if err != nil || r.Code != 0 {
		t.Fatalf("vtpmd init on %s: %v %s", h.Name, err, r)
	}
	return v
}

// Run runs a one-shot vtpmd command with this host's configuration (e.g.
// init, vm create); the daemon must not be running (the host TPM serves
// one connection at a time).
func (v *Vtpmd) Run(ctx context.Context, args ...string) (Result, error) {
	return run(ctx, v.Tools.Vtpmd, append([]string{"--config", v.ConfigPath}, args...)...)
}

// Ctl runs vtpmctl against this host's vtpmd (--socket appended).
func (v *Vtpmd) Ctl(ctx context.Context, args ...string) (Result, error) {
	return v.Tools.Ctl(ctx, append(args, "--socket", v.Socket)...)
}

// CtlCmd returns an unstarted vtpmctl command against this host's vtpmd,
// for callers that read its output as a stream.
func (v *Vtpmd) CtlCmd(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, v.Tools.Vtpmctl, append(args, "--socket", v.Socket)...)
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// subreaperPID is the pid of the process that runs the host's libvirtd:
// its namespaces are the host's.
func (h *Host) subreaperPID() (int, error) {
	b, err := os.ReadFile(filepath.Join(h.Dir, "subreaper.pid"))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// NsCommand returns a command that runs inside the host's network, mount
// and UTS namespaces.
func (h *Host) NsCommand(ctx context.Context, name string, args ...string) (*exec.Cmd, error) {
	pid, err := h.subreaperPID()
	if err != nil {
		return nil, err
	}
	return exec.CommandContext(ctx, "nsenter", append([]string{"-t", strconv.Itoa(pid), "-n", "-m", "-u", "--", name}, args...)...), nil
}

// Start runs 'vtpmd run' in the host's namespaces and waits (at most
// 60 s) until it prints its "ready:" line: it has bound its listeners,
// reconciled open transactions and serves. Its stdout and stderr are
// appended to LogPath.
func (v *Vtpmd) Start(ctx context.Context) error {
	if v.Running() {
		return fmt.Errorf("%w: vtpmd on %s already runs", ErrVtpmd, v.Host.Name)
	}
	logf, err := os.OpenFile(v.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	v.Starts++
	fmt.Fprintf(logf, "=== lab: start %d at %s\n", v.Starts, time.Now().Format(time.RFC3339Nano))
	// Not bound to ctx: the daemon lives until Stop or Kill.
	cmd, err := v.Host.NsCommand(context.Background(), v.Tools.Vtpmd, "--config", v.ConfigPath, "run")
	if err != nil {
		logf.Close()
		return err
	}
	cmd.Stderr = logf
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		logf.Close()
		return err
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("%w: start vtpmd on %s: %v", ErrVtpmd, v.Host.Name, err)
	}
	ready := make(chan struct{})
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		sc := bufio.NewScanner(stdout)
		once := false
		for sc.Scan() {
			fmt.Fprintln(logf, sc.Text())
			if !once && strings.HasPrefix(sc.Text(), "ready:") {
				once = true
				close(ready)
			}
		}
	}()
	done := make(chan struct{})
	v.cmd, v.done = cmd, done
	go func() { <-copied; _ = cmd.Wait(); logf.Close(); close(done) }()
	select {
	case <-ready:
		v.ServingSince = time.Now()
		return nil
	case <-done:
		return fmt.Errorf("%w: vtpmd on %s exited at start: %s", ErrVtpmd, v.Host.Name, v.LogTail(2000))
	case <-time.After(60 * time.Second):
		return fmt.Errorf("%w: vtpmd on %s: not ready after 60 s: %s", ErrVtpmd, v.Host.Name, v.LogTail(2000))
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Running reports whether the daemon process runs.
func (v *Vtpmd) Running() bool {
	if v.done == nil {
		return false
	}
	select {
	case <-v.done:
		return false
	default:
		return true
	}
}

// Kill SIGKILLs the daemon (a crash) and waits until it is gone.
func (v *Vtpmd) Kill() error {
	if !v.Running() {
		return nil
	}
	_ = syscall.Kill(-v.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-v.done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("%w: vtpmd on %s survived SIGKILL", ErrVtpmd, v.Host.Name)
	}
}

// Stop shuts the daemon down with SIGTERM (SIGKILL after 20 s).
func (v *Vtpmd) Stop() error {
	if !v.Running() {
		return nil
	}
	_ = v.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-v.done:
		return nil
	case <-time.After(20 * time.Second):
	}
	if err := v.Kill(); err != nil {
		return err
	}
	return fmt.Errorf("%w: vtpmd on %s ignored SIGTERM for 20 s; killed", ErrVtpmd, v.Host.Name)
}

// LogTail returns the last n bytes of the daemon's log.
func (v *Vtpmd) LogTail(n int) string {
	b, _ := os.ReadFile(v.LogPath)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// Virsh runs virsh against the host's own libvirtd, inside its namespaces
// (at most 2 minutes), and returns its combined output and wall time.
func (h *Host) Virsh(ctx context.Context, args ...string) (string, time.Duration, error) {
	rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd, err := h.NsCommand(rctx, "virsh", append([]string{"-c", "qemu:///system"}, args...)...)
	if err != nil {
		return "", 0, err
	}
	cmd.WaitDelay = 5 * time.Second
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	return string(out), time.Since(t0), err
}
