package lab

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/vtpm/emuhost"
)

// libvirtDirs are the directories a privileged libvirtd (and swtpm_localca)
// hard-code; each host bind-mounts its own copy over them.
var libvirtDirs = []string{"/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt",
	"/var/cache/libvirt", "/var/log/swtpm", "/var/lib/swtpm-localca"}

// HostConfig configures one emulated hypervisor host.
type HostConfig struct {
	Network *Network
	Name    string // host name, e.g. "host-a" (the UTS hostname is Name+".e2e.test")
	IP      string // address in Subnet, e.g. "10.251.0.1"
	// BootLog is the TCG event log the host TPM is booted with (path);
	// empty leaves its PCRs at zero.
	BootLog string
	// HostUUID is libvirt's host_uuid; it must differ per host. Default:
	// derived from IP.
	HostUUID string
	Log      logrus.FieldLogger
	// BeforeLibvirtd, when set, runs after the host's libvirt configuration
	// is written and before its libvirtd starts (libvirtd reads its hooks
	// directory when it starts).
	BeforeLibvirtd func(h *Host) error
}

// Host is a running emulated hypervisor host.
type Host struct {
	Name, IP, Dir, Netns string
	// URI reaches the host's libvirtd from the test process (its unix
	// socket through the bind source path).
	URI string
	// TCPURI is how other hosts' libvirtd reach it (qemu+tcp://IP/system).
	TCPURI string
	Emu    *emuhost.Host
	Hyp    *libvirt.Hypervisor

	cmd  *exec.Cmd
	done chan struct{}
	// For PowerOn: the network, the configuration and the logger.
	net *Network
	cfg HostConfig
	log logrus.FieldLogger
}

// Target is the migration target naming this host.
func (h *Host) Target() hypervisor.Target { return hypervisor.Target{Name: h.Name, URI: h.TCPURI} }

// Path maps a path as the host's daemons see it (e.g. /var/log/libvirt/…)
// to where the test process finds it.
func (h *Host) Path(p string) string { return filepath.Join(h.Dir, p) }

// NewHost starts a host: namespace on the network, config files, libvirtd
// under the subreaper (waits until its API answers), the host TPM, and a
// libvirt.Hypervisor connected through URI whose pre-checks reach other
// hosts of the same network through their unix sockets. Everything is
// stopped and removed when the test ends, also when it fails.
func NewHost(ctx context.Context, t T, cfg HostConfig) *Host {
	t.Helper()
	n := cfg.Network
	if n == nil || cfg.Name == "" || cfg.IP == "" {
		t.Fatal("lab.NewHost: Network, Name and IP are required")
	}
	if cfg.HostUUID == "" {
		cfg.HostUUID = hostUUID(cfg.IP)
	}
	h := &Host{Name: cfg.Name, IP: cfg.IP, Dir: filepath.Join(n.Dir, cfg.Name),
		TCPURI: "qemu+tcp://" + cfg.IP + "/system", done: make(chan struct{}), net: n, cfg: cfg}
	h.URI = "qemu:///system?socket=" + h.Path("/run/libvirt/libvirt-sock")
	for _, d := range append(libvirtDirs, "/var/log/libvirt/qemu") {
		if err := os.MkdirAll(h.Path(d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	_ = os.Chmod(h.Path("/var/lib/swtpm-localca"), 0o750)
	if err := h.writeConfig(cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.BeforeLibvirtd != nil {
		if err := cfg.BeforeLibvirtd(h); err != nil {
			t.Fatal(err)
		}
	}
	h.Netns = n.attach(ctx, t, cfg.IP)
	if err := writeNetnsFile(h.Dir, h.Netns); err != nil {
		t.Fatal(err)
	}

	// Host TPM first (stopped last).
	emu, err := emuhost.Start(ctx, emuhost.Config{Dir: filepath.Join(h.Dir, "hosttpm"), Name: cfg.Name})
	if err != nil {
		t.Fatal(err)
	}
	h.Emu = emu
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = h.Emu.Stop(sctx) // the current one (ReplaceTPM stops the one it replaces)
	})
	if cfg.BootLog != "" {
		b, err := os.ReadFile(cfg.BootLog)
		if err == nil {
			err = emu.Boot(ctx, b)
		}
		if err != nil {
			t.Fatalf("boot host TPM of %s: %v", cfg.Name, err)
		}
	}

	t.Cleanup(func() { h.stop(t) })
	if err := h.start(ctx, n); err != nil {
		t.Fatal(err)
	}
	h.log = cfg.Log
	if h.log == nil {
		h.log = logrus.New()
	}
	if err := h.connect(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Hyp.Close() })
	return h
}

// connect opens the host's libvirt.Hypervisor through URI; its pre-checks
// reach other hosts of the same network through their unix sockets.
func (h *Host) connect(ctx context.Context) error {
	n := h.net
	hyp, err := libvirt.New(ctx, libvirt.Config{URI: h.URI, Name: h.Name, Log: h.log,
		PeerURI: func(dest hypervisor.Target) string {
			// The test process is in the root namespace: reach peers by socket.
			if ip, ok := strings.CutPrefix(dest.URI, "qemu+tcp://"); ok {
				ip, _, _ = strings.Cut(ip, "/")
				for _, e := range listDirs(n.Dir) {
					if b, err := os.ReadFile(filepath.Join(e, "ip")); err == nil && string(b) == ip {
						return "qemu:///system?socket=" + filepath.Join(e, "run/libvirt/libvirt-sock")
					}
				}
			}
			return dest.URI
		}})
	if err != nil {
		return err
	}
	h.Hyp = hyp
	return nil
}

func listDirs(dir string) []string {
	ents, _ := os.ReadDir(dir)
	var out []string
	for _, e := range ents {
		if e.IsDir() {
			out = append(out, filepath.Join(dir, e.Name()))
		}
	}
	return out
}

// hostUUID derives a distinct libvirt host_uuid from an IPv4 address.
func hostUUID(ip string) string {
	var a, b, c, d int
	_, _ = fmt.Sscanf(ip, "%d.%d.%d.%d", &a, &b, &c, &d)
	return fmt.Sprintf("e2e0e2e0-0000-4000-8000-%04x%04x%04x", a<<8|b, c, d)
}

func (h *Host) writeConfig(cfg HostConfig) error {
	libvirtd := fmt.Sprintf(`listen_tls = 0
listen_tcp = 1
listen_addr = %q
tcp_port = "16509"
auth_tcp = "none"
auth_unix_rw = "none"
unix_sock_group = "root"
unix_sock_rw_perms = "0770"
host_uuid = %q
log_filters = "1:qemu.qemu_tpm 1:util.command 1:qemu.qemu_migration 3:*"
log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
`, cfg.IP, cfg.HostUUID)
	qemu := fmt.Sprintf(`user = "root"
group = "root"
swtpm_user = "root"
swtpm_group = "root"
stdio_handler = "file"
migration_host = %q
migration_address = %q
`, cfg.IP, cfg.IP)
	for name, body := range map[string]string{"/etc/libvirt/libvirtd.conf": libvirtd, "/etc/libvirt/qemu.conf": qemu} {
		if err := os.WriteFile(h.Path(name), []byte(body), 0o644); err != nil {
			return err
		}
	}
	return os.WriteFile(filepath.Join(h.Dir, "ip"), []byte(cfg.IP), 0o644)
}

// start runs libvirtd in the host's namespaces under the subreaper and
// waits until its API answers on the unix socket.
func (h *Host) start(ctx context.Context, n *Network) error {
	args := []string{"netns", "exec", h.Netns, "unshare", "--mount", "--uts", "--propagation", "private", "--",
		n.Subreaper, "-pidfile", filepath.Join(h.Dir, "subreaper.pid"), "-hostname", h.Name + ".e2e.test"}
	for _, d := range libvirtDirs {
		args = append(args, "-bind", h.Path(d)+":"+d)
	}
	args = append(args, "--", "libvirtd", "-l", "-f", "/etc/libvirt/libvirtd.conf", "-p", filepath.Join(h.Dir, "libvirtd.pid"))
	logf, err := os.Create(filepath.Join(h.Dir, "subreaper.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	h.cmd = exec.Command("ip", args...)
	h.cmd.Stdout, h.cmd.Stderr = logf, logf
	h.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := h.cmd.Start(); err != nil {
		close(h.done)
		return fmt.Errorf("start libvirtd of %s: %w", h.Name, err)
	}
	go func() { _ = h.cmd.Wait(); close(h.done) }()
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		probe, err := libvirt.New(wctx, libvirt.Config{URI: h.URI, Name: h.Name})
		if err == nil {
			_, err = probe.Domains(wctx) // the QEMU driver is initialised
			_ = probe.Close()
			if err == nil {
				return nil
			}
		}
		select {
		case <-h.done:
			return fmt.Errorf("%w: %s exited: %s", ErrDaemon, h.Name, h.logTail())
		case <-wctx.Done():
			return fmt.Errorf("%w: %s: %v: %s", ErrDaemon, h.Name, err, h.logTail())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (h *Host) logTail() string {
	var out []string
	for _, p := range []string{filepath.Join(h.Dir, "subreaper.log"), h.Path("/var/log/libvirt/libvirtd.log")} {
		b, _ := os.ReadFile(p)
		if len(b) > 2000 {
			b = b[len(b)-2000:]
		}
		out = append(out, p+":\n"+string(b))
	}
	return strings.Join(out, "\n")
}

// stop terminates the subreaper, which terminates libvirtd, QEMU and swtpm
// (SIGKILL after its grace time); if it does not exit, its process group
// and any QEMU left (pid files) are killed. The mounts live in the
// subreaper's private mount namespace and vanish with it.
func (h *Host) stop(t T) {
	if h.cmd == nil || h.cmd.Process == nil {
		return
	}
	if t.Failed() {
		t.Logf("lab: %s logs:\n%s", h.Name, h.logTail())
	}
	_ = h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.done:
		return
	case <-time.After(10 * time.Second):
	}
	t.Errorf("lab cleanup: subreaper of %s did not exit; killing", h.Name)
	_ = syscall.Kill(-h.cmd.Process.Pid, syscall.SIGKILL)
	pids, _ := filepath.Glob(h.Path("/run/libvirt/qemu/*.pid"))
	for _, p := range pids {
		var pid int
		if b, err := os.ReadFile(p); err == nil && filepath.Base(p) != "driver.pid" {
			if _, err := fmt.Sscanf(string(b), "%d", &pid); err == nil && pid > 1 {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	select {
	case <-h.done:
	case <-time.After(5 * time.Second):
		t.Errorf("lab cleanup: subreaper of %s still running", h.Name)
	}
}
