package host_test

import (
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/host"
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// passOf returns the VM key's passphrase.
func passOf(t *testing.T, a *host.Host, vm string) []byte {
	t.Helper()
	var out []byte
	if _, err := a.Keys().WithPassphrase(context.Background(), vm, func(p []byte) error { out = append(out, p...); return nil }); err != nil {
		t.Fatal(err)
	}
	return out
}

// opensWith reports whether pass opens a copy of the VM's vTPM state.
func opensWith(t *testing.T, state string, pass []byte) bool {
	t.Helper()
	ctx := context.Background()
	cp := filepath.Join(t.TempDir(), "tpm2")
	if out, err := exec.Command("cp", "-a", state, cp).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	p, err := swtpm.Start(ctx, swtpm.ProcessConfig{StateDir: cp, Passphrase: pass})
	if err == nil {
		err = p.Init(ctx)
		_ = p.Stop(ctx)
	}
	if err != nil && !errors.Is(err, swtpm.ErrWrongPassphrase) {
		t.Fatal(err)
	}
	return err == nil
}

// receive makes the VM's key look received by a migration (its own key
// committed as a pending one at the next generation), as a destination's
// key store has it after CommitPending.
func receive(t *testing.T, a *host.Host, vm string) {
	t.Helper()
	ctx := context.Background()
	k, gen, err := a.Keys().Get(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Destroy()
	const tx = "0123456789abcdef0123456789abcdef"
	if err := a.Keys().PutPending(ctx, vm, tx, gen+1, k); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Keys().CommitPending(ctx, vm, tx); err != nil {
		t.Fatal(err)
	}
}

// initAndOpen initialises a host on its own emulated TPM (vtpmd init) and
// opens it; it returns the host and its configuration.
func initAndOpen(ctx context.Context, t *testing.T) (*host.Host, host.Config) {
	t.Helper()
	cfg := testConfig(t, tpmtest.StartHost(t))
	if _, err := host.Init(ctx, cfg, host.Options{}, host.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	a, err := host.Open(ctx, cfg, host.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return a, cfg
}

// TestRotationAtColdStart: a VM whose key came by migration gets a new key
// at its next start on a host that runs its vTPM itself (no hypervisor);
// the state opens with the new key only, and the tenant's TPM keeps its
// state (it starts). The honest twin: a VM created here is not rotated.
func TestRotationAtColdStart(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	a, _ := initAndOpen(ctx, t)
	t.Cleanup(func() { _ = a.Close(ctx) })
	vm, err := a.CreateVM(ctx, "vm1", "")
	if err != nil {
		t.Fatal(err)
	}
	state := a.Layout().VMState(vm.UUID)
	created := passOf(t, a, vm.UUID)
	if a.NeedsRotation(vm.UUID) {
		t.Fatal("a VM created here is marked for rotation")
	}
	if _, err := a.StartVM(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if err := a.StopVM(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if got := passOf(t, a, vm.UUID); string(got) != string(created) {
		t.Fatal("a VM created here got a new key at its start")
	}

	receive(t, a, vm.UUID)
	if !a.NeedsRotation(vm.UUID) {
		t.Fatal("a received key is not marked for rotation")
	}
	st, err := a.StartVM(ctx, vm.UUID)
	if err != nil {
		t.Fatalf("start with the rotation: %v", err)
	}
	if err := a.StopVM(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if a.NeedsRotation(vm.UUID) || string(passOf(t, a, vm.UUID)) == string(created) || st.Generation != 2 {
		t.Fatalf("no rotation at the start (generation %d)", st.Generation)
	}
	if opensWith(t, state, created) || !opensWith(t, state, passOf(t, a, vm.UUID)) {
		t.Fatal("the state does not open with exactly the new key")
	}
}

// TestRekeyCrashRecoveredAtOpen: a rekey that died at each of swtpm's crash
// points is finished or undone when the host opens: the VM's key is the one
// its state opens with, and the VM starts.
func TestRekeyCrashRecoveredAtOpen(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	a, cfg := initAndOpen(ctx, t)
	vm, err := a.CreateVM(ctx, "vm1", "")
	if err != nil {
		t.Fatal(err)
	}
	state := a.Layout().VMState(vm.UUID)
	for _, point := range swtpm.RekeyPoints {
		old := passOf(t, a, vm.UUID)
		nk, _ := vtpm.NewVMKey(nil)
		if err := a.Keys().PutRekey(ctx, vm.UUID, nk); err != nil {
			t.Fatal(err)
		}
		_ = nk.WithPassphrase(func(np []byte) error {
			_, err := swtpm.Rekey(ctx, swtpm.RekeyConfig{StateDir: state, OldPassphrase: old, NewPassphrase: np,
				Crash: func(p swtpm.RekeyPoint) error {
					if p == point {
						return errors.New("crash")
					}
					return nil
				}})
			return err
		})
		nk.Destroy()
		_ = a.Close(ctx)
		if a, err = host.Open(ctx, cfg, host.Options{}); err != nil {
			t.Fatalf("%s: open after the crash: %v", point, err)
		}
		if _, err := a.StartVM(ctx, vm.UUID); err != nil {
			t.Fatalf("%s: start after the recovery: %v", point, err)
		}
		if err := a.StopVM(ctx, vm.UUID); err != nil {
			t.Fatal(err)
		}
		rotated := string(passOf(t, a, vm.UUID)) != string(old)
		t.Logf("crash at %s: new key committed %v", point, rotated)
		if want := point == swtpm.RekeyMidSwap || point == swtpm.RekeyAfterSwap; rotated != want {
			t.Fatalf("%s: rotated %v, want %v", point, rotated, want)
		}
	}
	_ = a.Close(ctx)
}
