package daemon_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/vtpm/host"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// newHost initialises an emulated host and returns a daemon configuration
// for it: no TLS, no attestation policy, no hypervisor.
func newHost(t *testing.T) daemon.Config {
	t.Helper()
	h := tpmtest.StartHost(t)
	dir, err := os.MkdirTemp("/tmp", "vtpmd-daemon-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg := daemon.DefaultConfig()
	cfg.HostID, cfg.DataDir, cfg.RunDir, cfg.TPM, cfg.EventLog = "host-a", filepath.Join(dir, "data"), filepath.Join(dir, "run"), h.URI(), ""
	if _, err := host.Init(context.Background(), cfg.Config, host.Options{}, host.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// checkClosed proves that the daemon let go of its ledger and audit log:
// both take an exclusive lock, which a second open in this process gets
// only after the daemon closed its own.
func checkClosed(t *testing.T, cfg daemon.Config) {
	t.Helper()
	db, err := bolt.Open(cfg.Layout().Ledger(), 0o600, &bolt.Options{Timeout: 200 * time.Millisecond})
	if err != nil {
		t.Errorf("ledger still open: %v", err)
	} else {
		db.Close()
	}
	l, err := audit.Open(cfg.AuditLogPath(), audit.Options{Host: cfg.HostID})
	if err != nil {
		t.Errorf("audit log still open: %v", err)
	} else {
		l.Close()
	}
	if _, err := os.Stat(cfg.AdminSocketPath()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("admin socket left behind: %v", err)
	}
}

// TestStartReadyClose: Start binds the admin socket before it returns, the
// daemon serves once Ready, and Close (twice) closes every resource.
func TestStartReadyClose(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	cfg := newHost(t)
	d, err := daemon.Start(ctx, cfg, daemon.Deps{})
	if err != nil {
		t.Fatal(err)
	}
	if a := d.AdminAddr(); a == nil || a.String() != cfg.AdminSocketPath() {
		t.Fatalf("admin address %v, want %s", a, cfg.AdminSocketPath())
	}
	if d.WireAddr() != nil || d.MetricsAddr() != nil || !d.RunsVTPMs() {
		t.Fatalf("without tls, metrics and hypervisor: wire %v, metrics %v, runs vTPMs %v", d.WireAddr(), d.MetricsAddr(), d.RunsVTPMs())
	}
	select {
	case <-d.Ready():
	case err := <-d.Err():
		t.Fatal(err)
	case <-time.After(30 * time.Second):
		t.Fatal("not ready after 30 s")
	}
	if _, err := d.Host().CreateVM(ctx, "web-1", ""); err != nil {
		t.Fatal(err)
	}
	c := adminapi.NewClient(cfg.AdminSocketPath())
	vms, err := c.VMs(ctx)
	if err != nil || len(vms) != 1 || vms[0].Name != "web-1" || !vms[0].Owned {
		t.Fatalf("VMs: %+v %v", vms, err)
	}
	// Hook mode without a hypervisor: the start is refused with the reason
	// (it used to dereference a nil hypervisor).
	_, err = c.HookPrepare(ctx, adminapi.HookRequest{UUID: vms[0].UUID, Name: "web-1"})
	if err == nil || !strings.Contains(err.Error(), hypervisor.ErrNoHypervisor.Error()) {
		t.Fatalf("hook prepare without a hypervisor: %v", err)
	}
	if err := d.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(ctx); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := c.VMs(ctx); !errors.Is(err, adminapi.ErrUnreachable) {
		t.Fatalf("admin API after Close: %v", err)
	}
	checkClosed(t, cfg)
}

// TestStartFailureCleansUp: a Start that fails after opening the host, the
// ledger and the audit log closes them again.
func TestStartFailureCleansUp(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	cfg := newHost(t)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for _, tc := range []struct {
		name string
		mod  func(*daemon.Config)
		want string
	}{
		{"metrics port taken", func(c *daemon.Config) { c.MetricsListen = busy.Addr().String() }, "metrics"},
		{"policy missing", func(c *daemon.Config) { c.Attestation.Policy = "/nonexistent/policy.yaml" }, "attestation.policy"},
		{"unknown hypervisor", func(c *daemon.Config) { c.Hypervisor = "xen:///system" }, "unknown hypervisor URI scheme"},
	} {
		c := cfg
		tc.mod(&c)
		d, err := daemon.Start(ctx, c, daemon.Deps{Hypervisors: hypervisor.NewRegistry()})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			if d != nil {
				_ = d.Close(ctx)
			}
			t.Fatalf("%s: Start: %v, want an error naming %s", tc.name, err, tc.want)
		}
		checkClosed(t, cfg)
		// The host TPM is free again: the next Start opens it.
	}
	d, err := daemon.Start(ctx, cfg, daemon.Deps{})
	if err != nil {
		t.Fatalf("Start after the failed ones: %v", err)
	}
	if err := d.Close(ctx); err != nil {
		t.Fatal(err)
	}
}
