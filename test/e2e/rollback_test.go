//go:build e2e

package e2e_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/test/lab"
)

// TestVtpmdRefusesRestoredDataDir is issue 10's attack 6 on the lab: host-b
// owns a VM, its whole data directory is backed up, the VM migrates back
// to host-a, and host-b's directory is restored from the backup. The real
// vtpmd refuses to start, naming the rollback (both anchor counters) and
// 'vtpmd anchor accept', with no stack trace; 'vtpmd vm list' refuses the
// same way; the newest directory back, it starts and owns nothing, and the
// VM runs on host-a only. The honest twin is every start before the
// restore.
func TestVtpmdRefusesRestoredDataDir(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	f := newVFleet(ctx, t, hostA(), hostB())
	a, b := f.Hosts["host-a"], f.Hosts["host-b"]
	vm := f.CreateVM(ctx, a, "fw-1", libvirt.VMSpec{TCG: !lab.KVM()})
	f.Start(ctx)
	f.Migrate(ctx, vm, a, b)
	if owner, report, err := f.Owner(ctx, vm); err != nil || owner != b.Name {
		t.Fatalf("owner %q, %v\n%s", owner, err, report)
	}
	data := b.Vtpmd.DataDir
	backup, newest := data+".backup", data+".newest"
	if err := b.Vtpmd.Stop(); err != nil {
		t.Fatal(err)
	}
	cp(t, data, backup)
	if err := b.Vtpmd.Start(ctx); err != nil {
		t.Fatalf("the honest twin: %v", err)
	}
	f.Migrate(ctx, vm, b, a)
	if owner, report, err := f.Owner(ctx, vm); err != nil || owner != a.Name {
		t.Fatalf("owner %q, %v\n%s", owner, err, report)
	}

	if err := b.Vtpmd.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(data, newest); err != nil {
		t.Fatal(err)
	}
	cp(t, backup, data)
	err := b.Vtpmd.Start(ctx)
	if err == nil || !errors.Is(err, lab.ErrVtpmd) {
		t.Fatalf("vtpmd started on the restored data directory: %v", err)
	}
	for _, want := range []string{"data directory rolled back", "anchor.json records anchor counter", "restored from a backup", "vtpmd anchor accept"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("the refusal lacks %q:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), "goroutine ") || strings.Contains(err.Error(), "panic") {
		t.Fatalf("a stack trace:\n%v", err)
	}
	t.Logf("restored data directory refused: %v", err)
	r, err := b.Vtpmd.Run(ctx, "vm", "list")
	if err != nil || r.Code == 0 || !strings.Contains(r.Stderr, "rolled back") {
		t.Fatalf("vtpmd vm list on the restored directory: %v %s", err, r)
	}

	// The newest directory back: host-b starts and owns nothing of the VM.
	if err := os.RemoveAll(data); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(newest, data); err != nil {
		t.Fatal(err)
	}
	if err := b.Vtpmd.Start(ctx); err != nil {
		t.Fatalf("start on the newest directory: %v", err)
	}
	if owner, report, err := f.Owner(ctx, vm); err != nil || owner != a.Name {
		t.Fatalf("owner %q, %v\n%s", owner, err, report)
	}
}

func cp(t *testing.T, from, to string) {
	t.Helper()
	_ = os.RemoveAll(to)
	if out, err := exec.Command("cp", "-a", from, to).CombinedOutput(); err != nil {
		t.Fatalf("cp %s %s: %v %s", from, to, err, out)
	}
}
