package swtpm_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/internal/guestseal"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

var tenantSecret = []byte("tenant LUKS key, sealed in the guest")

// guestVTPM manufactures a vTPM under pass, runs a guest-side client that
// seals a secret (a persistent object and an NV index, by guestseal) and
// shuts it down, as a VM that was shut off.
func guestVTPM(t *testing.T, pass []byte) string {
	t.Helper()
	ctx := context.Background()
	state := setup(t, pass)
	p := start(t, state, pass)
	if err := p.Init(ctx); err != nil {
		t.Fatal(err)
	}
	tpm := open(t, p)
	if err := guestseal.Seal(ctx, tpm, tenantSecret, []int{16}); err != nil {
		t.Fatal(err)
	}
	tpmtest.CheckNoLeaks(t, tpm)
	_, _ = tpm2.Shutdown{ShutdownType: tpm2.TPMSUClear}.Execute(tpm)
	tpm.Close()
	if err := p.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	return state
}

// opensWith starts swtpm on state with pass and, when it opens, unseals the
// guest's secret. It returns the Init error.
func opensWith(t *testing.T, state string, pass []byte) error {
	t.Helper()
	ctx := context.Background()
	p := start(t, state, pass)
	defer p.Stop(ctx)
	if err := p.Init(ctx); err != nil {
		return err
	}
	tpm := open(t, p)
	defer tpm.Close()
	got, err := guestseal.Unseal(ctx, tpm)
	if err != nil || !bytes.Equal(got, tenantSecret) {
		t.Fatalf("Unseal after rekey = %q, %v", got, err)
	}
	tpmtest.CheckNoLeaks(t, tpm)
	return nil
}

func vmKey(t *testing.T) (vtpm.VMKey, []byte) {
	t.Helper()
	k, err := vtpm.NewVMKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	return k, passOf(t, k)
}

func cloneState(t *testing.T, state string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "vm", "tpm2")
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", "-a", state, dst).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	return dst
}

func noLeftovers(t *testing.T, state string) {
	t.Helper()
	for _, s := range []string{".rekey-new", ".rekey-old", ".rekey-src"} {
		if _, err := os.Lstat(state + s); err == nil {
			t.Errorf("%s%s left behind", state, s)
		}
	}
}

// TestRekeyWithKeyStore is the whole flow as vtpmd will run it: the new key
// pending in the key store, the state re-encrypted, the key committed, the
// old state shredded; with 0 host TPM commands.
func TestRekeyWithKeyStore(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, host := tpmtest.NewHost(t)
	dir := t.TempDir()
	v, err := vtpm.InitVault(ctx, host, vtpm.VaultConfig{Dir: dir}, vtpm.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	ks, err := vtpm.NewKeyStore(dir, "host-a", v, nil)
	if err != nil {
		t.Fatal(err)
	}
	oldKey, gen, err := ks.Create(ctx, vmid)
	if err != nil {
		t.Fatal(err)
	}
	state := guestVTPM(t, passOf(t, oldKey))
	origPerm, _ := os.ReadFile(filepath.Join(state, "tpm2-00.permall"))

	meter := vtpm.NewMeter(host, vtpm.ProfileDTPM, vtpm.WithSleep(func(time.Duration) {}))
	_ = meter // every key store call below runs with the vault key in memory: no TPM on the path
	before := meter.Stats()
	t0 := time.Now()
	newKey, _ := vmKey(t)
	if err := ks.PutRekey(ctx, vmid, newKey); err != nil {
		t.Fatal(err)
	}
	if err := ks.PutRekey(ctx, vmid, newKey); !errors.Is(err, vtpm.ErrKeyExists) {
		t.Fatalf("second PutRekey: %v", err)
	}
	cur, _, err := ks.Get(ctx, vmid)
	if err != nil {
		t.Fatal(err)
	}
	next, err := ks.GetRekey(ctx, vmid)
	if err != nil {
		t.Fatal(err)
	}
	res, err := swtpm.Rekey(ctx, swtpm.RekeyConfig{StateDir: state, OldPassphrase: passOf(t, cur), NewPassphrase: passOf(t, next)})
	if err != nil {
		t.Fatal(err)
	}
	if err := ks.CommitRekey(ctx, vmid); err != nil {
		t.Fatal(err)
	}
	if err := swtpm.FinishRekey(ctx, state); err != nil {
		t.Fatal(err)
	}
	wall := time.Since(t0)
	s := meter.Stats().Sub(before)
	t.Logf("rekey: %v wall (swtpm part %v), %d blob(s), %d bytes, host TPM commands: %d", wall, res.Elapsed, res.Blobs, res.Bytes, s.Total)
	if s.Total != 0 {
		t.Fatalf("rekey sent %s to the host TPM", s)
	}

	got, g2, err := ks.Get(ctx, vmid)
	if err != nil || g2 != gen || !got.Equal(newKey) {
		t.Fatalf("after commit: generation %d (want %d), new key %v, %v", g2, gen, got.Equal(newKey), err)
	}
	if err := opensWith(t, state, passOf(t, oldKey)); !errors.Is(err, swtpm.ErrWrongPassphrase) {
		t.Fatalf("old key after rekey: %v, want ErrWrongPassphrase", err)
	}
	if err := opensWith(t, state, passOf(t, newKey)); err != nil {
		t.Fatalf("new key after rekey: %v", err)
	}
	if err := swtpm.CheckEncryptedAtRest(state); err != nil {
		t.Fatal(err)
	}
	if now, _ := os.ReadFile(filepath.Join(state, "tpm2-00.permall")); bytes.Equal(now, origPerm) {
		t.Fatal("state file unchanged by the rekey")
	}
	noLeftovers(t, state)
	cs, err := ks.CheckKeys(ctx)
	if err != nil || len(cs) != 1 || cs[0].Damaged {
		t.Fatalf("key store after rekey: %v, %v", cs, err)
	}
}

func TestRekeyRefusals(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, oldPass := vmKey(t)
	_, newPass := vmKey(t)
	state := guestVTPM(t, oldPass)
	orig, _ := os.ReadFile(filepath.Join(state, "tpm2-00.permall"))

	_, wrong := vmKey(t)
	_, err := swtpm.Rekey(ctx, swtpm.RekeyConfig{StateDir: state, OldPassphrase: wrong, NewPassphrase: newPass})
	if !errors.Is(err, swtpm.ErrWrongPassphrase) {
		t.Fatalf("Rekey with a wrong old key: %v, want ErrWrongPassphrase", err)
	}
	if now, _ := os.ReadFile(filepath.Join(state, "tpm2-00.permall")); !bytes.Equal(now, orig) {
		t.Fatal("a failed rekey changed the state")
	}
	noLeftovers(t, state)
	if _, err := swtpm.Rekey(ctx, swtpm.RekeyConfig{StateDir: state, OldPassphrase: oldPass, NewPassphrase: oldPass}); !errors.Is(err, swtpm.ErrBadConfig) {
		t.Fatalf("Rekey to the same key: %v", err)
	}
	// An unfinished earlier rekey must be recovered first.
	if err := os.Mkdir(state+".rekey-src", 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := swtpm.Rekey(ctx, swtpm.RekeyConfig{StateDir: state, OldPassphrase: oldPass, NewPassphrase: newPass}); !errors.Is(err, swtpm.ErrRekeyState) {
		t.Fatalf("Rekey over an unfinished one: %v", err)
	}
	if nk, err := swtpm.RecoverRekey(ctx, state); err != nil || nk {
		t.Fatalf("RecoverRekey of a crashed export: %v, %v", nk, err)
	}
	noLeftovers(t, state)
	if err := opensWith(t, state, oldPass); err != nil {
		t.Fatal(err)
	}
}

// TestRekeyCrashAtEveryPoint crashes a rekey at each named point and
// recovers: the state opens with exactly the key RecoverRekey names, the
// other key opens nothing, and the guest's secret unseals.
func TestRekeyCrashAtEveryPoint(t *testing.T) {
	t.Parallel()
	_, oldPass := vmKey(t)
	_, newPass := vmKey(t)
	golden := guestVTPM(t, oldPass)
	wantNew := map[swtpm.RekeyPoint]bool{
		swtpm.RekeyAfterExport: false, swtpm.RekeyAfterImport: false, swtpm.RekeyAfterVerify: false,
		swtpm.RekeyMidSwap: true, swtpm.RekeyAfterSwap: true,
	}
	for _, pt := range swtpm.RekeyPoints {
		t.Run(string(pt), func(t *testing.T) {
			ctx := context.Background()
			state := cloneState(t, golden)
			crashed := errors.New("crash")
			_, err := swtpm.Rekey(ctx, swtpm.RekeyConfig{StateDir: state, OldPassphrase: oldPass, NewPassphrase: newPass,
				Crash: func(at swtpm.RekeyPoint) error {
					if at == pt {
						return crashed
					}
					return nil
				}})
			if !errors.Is(err, crashed) {
				t.Fatalf("Rekey: %v, want the injected crash", err)
			}
			ph, err := swtpm.RekeyPhaseOf(state)
			if err != nil {
				t.Fatal(err)
			}
			nk, err := swtpm.RecoverRekey(ctx, state)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("crash at %s: phase %s, opens with the new key: %v", pt, ph, nk)
			if nk != wantNew[pt] {
				t.Fatalf("RecoverRekey = new key %v, want %v", nk, wantNew[pt])
			}
			right, other := oldPass, newPass
			if nk {
				right, other = newPass, oldPass
			}
			if err := opensWith(t, state, other); !errors.Is(err, swtpm.ErrWrongPassphrase) {
				t.Fatalf("the other key: %v, want ErrWrongPassphrase", err)
			}
			if err := opensWith(t, state, right); err != nil {
				t.Fatalf("the key RecoverRekey named: %v", err)
			}
			// Finish as the caller would: commit and shred, or rekey again.
			if nk {
				if err := swtpm.FinishRekey(ctx, state); err != nil {
					t.Fatal(err)
				}
			} else if _, err := swtpm.Rekey(ctx, swtpm.RekeyConfig{StateDir: state, OldPassphrase: oldPass, NewPassphrase: newPass}); err != nil {
				t.Fatalf("rekey after recovery: %v", err)
			} else if err := swtpm.FinishRekey(ctx, state); err != nil {
				t.Fatal(err)
			}
			noLeftovers(t, state)
			if err := opensWith(t, state, newPass); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestRekeyCarriesSavedVolatileState: a vTPM with a saved volatile state
// (PCR values) keeps it, and the old directory is untouched until the swap.
func TestRekeyCarriesSavedVolatileState(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, oldPass := vmKey(t)
	_, newPass := vmKey(t)
	state := guestVTPM(t, oldPass)
	p := start(t, state, oldPass)
	if err := p.Init(ctx); err != nil {
		t.Fatal(err)
	}
	tpm := open(t, p)
	extend(t, tpm, 15, "runtime measurement")
	want := pcr(t, tpm, 15)
	tpm.Close()
	if err := p.Ctrl().StoreVolatile(ctx); err != nil {
		t.Fatal(err)
	}
	if err := p.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	vol := filepath.Join(state, "tpm2-00.volatilestate")
	if _, err := os.Stat(vol); err != nil {
		t.Fatal(err)
	}
	res, err := swtpm.Rekey(ctx, swtpm.RekeyConfig{StateDir: state, OldPassphrase: oldPass, NewPassphrase: newPass,
		Crash: func(pt swtpm.RekeyPoint) error {
			if pt == swtpm.RekeyAfterVerify {
				if _, err := os.Stat(vol); err != nil {
					return fmt.Errorf("old volatile state gone before the swap: %w", err)
				}
			}
			return nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Blobs != 2 {
		t.Fatalf("carried %d blobs, want 2", res.Blobs)
	}
	if err := swtpm.FinishRekey(ctx, state); err != nil {
		t.Fatal(err)
	}
	q := start(t, state, newPass)
	if err := q.Init(ctx); err != nil {
		t.Fatal(err)
	}
	tpm = open(t, q)
	defer tpm.Close()
	if got := pcr(t, tpm, 15); !bytes.Equal(got, want) {
		t.Fatalf("PCR 15 after rekey = %x, want %x", got, want)
	}
}

// BenchmarkRekey measures the wall time of one rekey of a manufactured
// vTPM (swtpm_setup state plus a sealed secret).
func BenchmarkRekey(b *testing.B) {
	ctx := context.Background()
	keys := [2][]byte{}
	for i := range keys {
		k, err := vtpm.NewVMKey(nil)
		if err != nil {
			b.Fatal(err)
		}
		keys[i] = passOf(b, k)
	}
	dir := b.TempDir()
	state := filepath.Join(dir, "vm", "tpm2")
	if err := swtpm.Setup(ctx, swtpm.SetupConfig{StateDir: state, VMID: vmid, Passphrase: keys[0]}); err != nil {
		b.Fatal(err)
	}
	i := 0
	for b.Loop() {
		if _, err := swtpm.Rekey(ctx, swtpm.RekeyConfig{StateDir: state, OldPassphrase: keys[i%2], NewPassphrase: keys[(i+1)%2]}); err != nil {
			b.Fatal(err)
		}
		if err := swtpm.FinishRekey(ctx, state); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// passOf copies k's passphrase for a test that hands it to swtpm itself.
func passOf(t testing.TB, k vtpm.VMKey) []byte {
	t.Helper()
	var p []byte
	if err := k.WithPassphrase(func(pass []byte) error { p = bytes.Clone(pass); return nil }); err != nil {
		t.Fatal(err)
	}
	return p
}
