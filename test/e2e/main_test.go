//go:build e2e

package e2e_test

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/fixtures"
	"github.com/vtpmm/vtpmm/test/guest"
	"github.com/vtpmm/vtpmm/test/lab"
)

// The boot logs of the shared fixtures (internal/fixtures), written below
// fixtureDir by TestMain for the tools that take a path.
var goodLog, badLog string

// The hosts: two trusted, host-c booted from the tampered log.
func hostA() lab.HostSpec { return lab.HostSpec{Name: "host-a", IP: "10.251.0.1", BootLog: goodLog} }
func hostB() lab.HostSpec { return lab.HostSpec{Name: "host-b", IP: "10.251.0.2", BootLog: goodLog} }
func hostC() lab.HostSpec { return lab.HostSpec{Name: "host-c", IP: "10.251.0.3", BootLog: badLog} }

// The real vtpmd and vtpmctl are built once per test binary, into toolsDir.
var (
	toolsDir  string
	toolsOnce sync.Once
	tools     lab.Tools
	toolsErr  error
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "vtpmm-e2e-fixtures-")
	if err == nil {
		goodLog, badLog, err = fixtures.BootLogs(dir)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	if toolsDir != "" {
		_ = os.RemoveAll(toolsDir)
	}
	os.Exit(code)
}

// sharedTools builds vtpmd and vtpmctl (once per test binary).
func sharedTools(ctx context.Context, t *testing.T) lab.Tools {
	t.Helper()
	toolsOnce.Do(func() {
		if toolsDir, toolsErr = os.MkdirTemp("/tmp", "vtpmm-e2e-bin-"); toolsErr != nil {
			return
		}
		tools, toolsErr = lab.BuildTools(ctx, toolsDir)
	})
	if toolsErr != nil {
		t.Fatal(fmt.Errorf("vtpmd/vtpmctl: %w", toolsErr))
	}
	return tools
}

// requireLab skips the test when a prerequisite of the lab is missing,
// or fails it when VTPMM_E2E_REQUIRE=1 (make test sets it, so CI cannot
// pass by skipping the e2e suite).
func requireLab(t *testing.T) {
	t.Helper()
	if err := lab.Require(); err != nil {
		if os.Getenv("VTPMM_E2E_REQUIRE") == "1" {
			t.Fatalf("VTPMM_E2E_REQUIRE=1: %v", err)
		}
		t.Skip(err)
	}
}

// newNetwork is lab.NewNetwork, skipping the test when a prerequisite of
// the lab is missing.
func newNetwork(ctx context.Context, t *testing.T) *lab.Network {
	t.Helper()
	requireLab(t)
	return lab.NewNetwork(ctx, t, lab.NetworkConfig{Prefix: "ve2e"})
}

// newVFleet brings up a lab.Fleet of the given hosts, each with its real
// vtpmd initialised but not running (Fleet.Start); the policy is built
// from goodLog.
func newVFleet(ctx context.Context, t *testing.T, specs ...lab.HostSpec) *lab.Fleet {
	t.Helper()
	return newRegistryFleet(ctx, t, "none", specs...)
}

// newRegistryFleet is newVFleet with the fleet registry in mode registry
// ("none", or "embedded": an etcd member in every host's vtpmd).
// VTPMM_E2E_KEEP=1 keeps the lab's directories (logs) after a pass.
func newRegistryFleet(ctx context.Context, t *testing.T, registry string, specs ...lab.HostSpec) *lab.Fleet {
	t.Helper()
	requireLab(t)
	f := lab.NewFleet(ctx, t, lab.FleetConfig{Network: lab.NetworkConfig{Prefix: "ve2e", Keep: os.Getenv("VTPMM_E2E_KEEP") == "1"},
		Tools: sharedTools(ctx, t), GoodLog: goodLog, Hosts: specs, Log: logger(t), Registry: registry})
	f.AddHosts(ctx)
	return f
}

// guestImage builds the Linux guest (cached in guest.DefaultDir()).
func guestImage(ctx context.Context, t *testing.T) *guest.Image {
	t.Helper()
	root, err := lab.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	img, err := guest.Build(ctx, guest.Config{Dir: guest.DefaultDir(), ModuleDir: root})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest image ready in %v", time.Since(t0).Round(time.Millisecond))
	return img
}
