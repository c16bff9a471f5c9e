//go:build e2e

package e2e_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/test/lab"
)

// hookWaitCalls is how many DefineSecret calls TestLibvirtCallsWhileStartWaitsForHook
// makes while the start waits in the hook.
const hookWaitCalls = 300

// TestLibvirtCallsWhileStartWaitsForHook is the libvirt side of the
// partition hang (TestE2EFailoverPartition, docs/failover.md): a domain's
// start waits in its qemu hook ('prepare begin'), and meanwhile the same
// Hypervisor (one process, as vtpmd: the hook asks vtpmd, whose handler
// defines the secret) makes libvirt calls. Every call must return while
// the start still waits, and the start must succeed with the secret those
// calls set in place.
//
// Before the fix the start ran on the Hypervisor's shared connection, where
// it held libvirt 9.0's dispatching "buck" for as long as the hook ran; a
// call from another thread whose wakeup of the holder was lost
// (virNetClientIO's g_main_loop_quit before the holder is back in
// g_main_loop_run) was never sent until the start returned: with vtpmd in
// the hook's path, a deadlock until the hook's timeout. The start now runs
// on a connection of its own (Hypervisor.withOwn), and DefineSecret sets
// the value of the VM's existing secret in place instead of undefining it
// under the starting domain.
func TestLibvirtCallsWhileStartWaitsForHook(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	n := newNetwork(ctx, t)
	var armed, entered, release string
	h := lab.NewHost(ctx, t, lab.HostConfig{Network: n, Name: "host-a", IP: "10.251.0.1", BootLog: goodLog, Log: logger(t),
		BeforeLibvirtd: func(h *lab.Host) error {
			armed, entered, release = filepath.Join(h.Dir, "hook-armed"), filepath.Join(h.Dir, "hook-entered"), filepath.Join(h.Dir, "hook-release")
			// A qemu hook that, when armed, holds 'prepare begin' until the
			// test releases it (at most 3 min).
			script := fmt.Sprintf(`#!/bin/sh
/usr/bin/cat >/dev/null
if [ "$2 $3" = "prepare begin" ] && [ -e %[1]s ]; then
  /usr/bin/touch %[2]s
  i=0
  while [ ! -e %[3]s ] && [ $i -lt 900 ]; do /usr/bin/sleep 0.2; i=$((i+1)); done
fi
exit 0
`, armed, entered, release)
			dir := h.Path("/etc/libvirt/hooks/qemu.d")
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return err
			}
			return os.WriteFile(filepath.Join(dir, "gate"), []byte(script), 0o755)
		}})
	vm, pass := lab.NewUUID(), passphrase()
	startVM(ctx, t, h, vm, "hookwait", pass) // the hook is not armed: libvirt creates the vTPM state
	if err := h.Hyp.DestroyDomain(ctx, vm); err != nil {
		t.Fatal(err)
	}

	if err := os.WriteFile(armed, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	started := make(chan error, 1)
	go func() { started <- h.Hyp.StartDomain(ctx, vm) }()
	deadline := time.Now().Add(time.Minute)
	for {
		if _, err := os.Stat(entered); err == nil {
			break
		}
		select {
		case err := <-started:
			t.Fatalf("the start returned before its hook held it: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the start never reached its qemu hook")
		}
		time.Sleep(50 * time.Millisecond)
	}

	// While the start waits in the hook: DefineSecret again and again, as
	// vtpmd's 'prepare begin' handler does.
	type result struct {
		took []time.Duration
		err  error
	}
	done := make(chan result, 1)
	go func() {
		var r result
		for i := 0; i < hookWaitCalls; i++ {
			t0 := time.Now()
			if err := h.Hyp.DefineSecret(ctx, vm, pass); err != nil {
				r.err = fmt.Errorf("DefineSecret %d: %w", i, err)
				break
			}
			r.took = append(r.took, time.Since(t0))
		}
		done <- r
	}()
	select {
	case r := <-done:
		if r.err != nil {
			t.Error(r.err)
		}
		if len(r.took) > 0 {
			sort.Slice(r.took, func(i, j int) bool { return r.took[i] < r.took[j] })
			t.Logf("%d DefineSecret calls while the start waited in its hook: median %v, max %v", len(r.took),
				r.took[len(r.took)/2].Round(time.Microsecond), r.took[len(r.took)-1].Round(time.Microsecond))
		}
	case <-time.After(90 * time.Second):
		t.Errorf("DefineSecret blocked while the start waited in the qemu hook (90 s): libvirt's client sent it only after the start returned")
	}
	// (No Domain() here: libvirt holds the domain's lock while the hook runs.)

	if err := os.WriteFile(release, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-started:
		if err != nil {
			t.Fatalf("the start after the hook let it go on: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("the start did not return after the hook was released")
	}
	if d, err := h.Hyp.Domain(ctx, vm); err != nil || d.State != hypervisor.StateRunning {
		t.Fatalf("%s after the start: %q %v, want running (its secret set in place)", vm, d.State, err)
	}
	if err := h.Hyp.DestroyDomain(ctx, vm); err != nil {
		t.Error(err)
	}
}
