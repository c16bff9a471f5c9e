package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"time"
)

// Subnet is the /24 the hosts' addresses come from (inside the namespaces
// only; nothing is routed to the root namespace).
const Subnet = "10.251.0.0/24"

// Network is a hub network namespace with a bridge; every host's network
// namespace is attached to it through a veth pair.
type Network struct {
	// ID prefixes the namespaces' names (unique per Network).
	ID string
	// Dir holds the hosts' directories and the subreaper binary.
	Dir string
	// Subreaper is the path of the built cmd/subreaper.
	Subreaper string

	hub   string
	hosts int
	links map[string]string // host namespace -> its veth's end on the hub
}

// Require reports the first missing prerequisite of the lab: root,
// iproute2, util-linux's unshare and nsenter, libvirtd, QEMU, swtpm and
// the libvirt-qemu user.
func Require() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: must run as root", ErrMissing)
	}
	for _, b := range []string{"ip", "unshare", "nsenter", "libvirtd", "qemu-system-x86_64", "swtpm", "swtpm_setup"} {
		if _, err := exec.LookPath(b); err != nil {
			return fmt.Errorf("%w: %s: %v", ErrMissing, b, err)
		}
	}
	if _, err := user.Lookup("libvirt-qemu"); err != nil {
		return fmt.Errorf("%w: user libvirt-qemu (libvirt's QEMU driver needs it even with user=root): %v", ErrMissing, err)
	}
	return nil
}

// KVM reports whether /dev/kvm can be opened; without it VMs use TCG.
func KVM() bool {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// NetworkConfig configures NewNetwork; the zero value is fine.
type NetworkConfig struct {
	// Prefix starts the namespaces' and the directory's names (default
	// "vlab"); a random suffix makes them unique.
	Prefix string
	// Subreaper is a prebuilt cmd/subreaper; empty builds it with go build
	// in the module (ModuleRoot).
	Subreaper string
	// Keep keeps the directory after a run that did not fail (one that
	// failed always keeps it, for inspection).
	Keep bool
}

// NewNetwork creates the hub namespace (and builds the subreaper). It
// fails with ErrMissing when a prerequisite is missing (callers that
// rather skip check Require first). Everything is removed when the test
// ends: the namespaces always, the directory unless the test failed.
func NewNetwork(ctx context.Context, t T, cfg NetworkConfig) *Network {
	t.Helper()
	if err := Require(); err != nil {
		t.Fatal(err)
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "vlab"
	}
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	id := cfg.Prefix + "-" + hex.EncodeToString(b)
	dir, err := os.MkdirTemp("/tmp", id+"-")
	if err != nil {
		t.Fatal(err)
	}
	n := &Network{ID: id, Dir: dir, hub: id + "-hub", Subreaper: cfg.Subreaper, links: map[string]string{}}
	t.Cleanup(func() {
		if t.Failed() || cfg.Keep {
			t.Logf("lab: keeping %s for inspection", dir)
			return
		}
		_ = os.RemoveAll(dir)
	})
	if n.Subreaper == "" {
		n.Subreaper = filepath.Join(dir, "subreaper")
		if err := buildSubreaper(ctx, n.Subreaper); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { n.delNetns(t, n.hub) })
	if err := n.ip(ctx, "netns", "add", n.hub); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"-n", n.hub, "link", "add", "br0", "type", "bridge"},
		{"-n", n.hub, "link", "set", "br0", "up"},
		{"-n", n.hub, "link", "set", "lo", "up"},
	} {
		if err := n.ip(ctx, args...); err != nil {
			t.Fatal(err)
		}
	}
	return n
}

// ip runs iproute2.
func (n *Network) ip(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// attach creates a host's namespace with eth0 (ip/24) bridged to the hub
// and lo up; it is deleted (with its veth) when the test ends.
func (n *Network) attach(ctx context.Context, t T, ip string) string {
	t.Helper()
	n.hosts++
	ns := fmt.Sprintf("%s-%d", n.ID, n.hosts)
	hubSide := fmt.Sprintf("h%d", n.hosts)
	n.links[ns] = hubSide
	t.Cleanup(func() { n.delNetns(t, ns) })
	if err := n.ip(ctx, "netns", "add", ns); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"-n", n.hub, "link", "add", hubSide, "type", "veth", "peer", "name", "eth0", "netns", ns},
		{"-n", n.hub, "link", "set", hubSide, "master", "br0"},
		{"-n", n.hub, "link", "set", hubSide, "up"},
		{"-n", ns, "addr", "add", ip + "/24", "dev", "eth0"},
		{"-n", ns, "link", "set", "lo", "up"},
		{"-n", ns, "link", "set", "eth0", "up"},
	} {
		if err := n.ip(ctx, args...); err != nil {
			t.Fatal(err)
		}
	}
	return ns
}

// delNetns deletes a namespace (its veth ends go with it).
func (n *Network) delNetns(t T, ns string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := os.Stat(filepath.Join("/run/netns", ns)); err != nil {
		return
	}
	if err := n.ip(ctx, "netns", "del", ns); err != nil {
		t.Errorf("lab cleanup: %v", err)
	}
}

// buildSubreaper builds cmd/subreaper into out.
func buildSubreaper(ctx context.Context, out string) error {
	root, err := ModuleRoot()
	if err != nil {
		return err
	}
	build := exec.CommandContext(ctx, "go", "build", "-o", out, SubreaperPackage)
	build.Dir = root
	if b, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build subreaper: %v\n%s", err, b)
	}
	return nil
}

// SubreaperPackage is the import path of the subreaper command.
const SubreaperPackage = "github.com/vtpmm/vtpmm/test/lab/cmd/subreaper"

// Cut takes the host's link to the lab network down (its veth's end on
// the hub): from then on it reaches no other host, and none reaches it
// (its etcd member, agent wire and libvirtd), while everything on it keeps
// running: a network partition of that host. Heal undoes it.
func (n *Network) Cut(ctx context.Context, h *Host) error {
	return n.setLink(ctx, h, "down")
}

// Heal brings the host's link to the lab network back up (after Cut).
func (n *Network) Heal(ctx context.Context, h *Host) error {
	return n.setLink(ctx, h, "up")
}

func (n *Network) setLink(ctx context.Context, h *Host, state string) error {
	link, ok := n.links[h.Netns]
	if !ok {
		return fmt.Errorf("lab: %s is not on network %s", h.Name, n.ID)
	}
	return n.ip(ctx, "-n", n.hub, "link", "set", link, state)
}

// Reachable reports whether a TCP connection from inside h's namespaces to
// addr (host:port) succeeds within timeout (bash's /dev/tcp, run with
// nsenter).
func (h *Host) Reachable(ctx context.Context, addr string, timeout time.Duration) bool {
	host, port, ok := strings.Cut(addr, ":")
	if !ok {
		return false
	}
	cmd, err := h.NsCommand(ctx, "timeout", fmt.Sprintf("%.1f", timeout.Seconds()), "bash", "-c",
		fmt.Sprintf("exec 3<>/dev/tcp/%s/%s", host, port))
	if err != nil {
		return false
	}
	cmd.WaitDelay = time.Second
	return cmd.Run() == nil
}
