package vtpm_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

func extendPCR(t *testing.T, tpm transport.TPM, pcr int, data string) {
	t.Helper()
	d := sha256.Sum256([]byte(data))
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: d[:]}}},
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("extend PCR %d: %v", pcr, err)
	}
}

func predictExtend(cur []byte, data string) []byte {
	d := sha256.Sum256([]byte(data))
	h := sha256.Sum256(append(slices.Clone(cur), d[:]...))
	return h[:]
}

func TestVaultBoundToTPMAndBootState(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, tpmA := tpmtest.NewHost(t)
	_, tpmB := tpmtest.NewHost(t)
	dir := t.TempDir()
	cfg := vtpm.VaultConfig{Dir: dir}

	v, err := vtpm.InitVault(ctx, tpmA, cfg, vtpm.InitOptions{})
	if err != nil {
		t.Fatalf("InitVault: %v", err)
	}
	id := v.KeyID()
	v.Close()
	if _, err := vtpm.InitVault(ctx, tpmA, cfg, vtpm.InitOptions{}); !errors.Is(err, vtpm.ErrVaultExists) {
		t.Fatalf("second InitVault: got %v, want ErrVaultExists", err)
	}
	st, err := os.Stat(filepath.Join(dir, vtpm.VaultFileName))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("vault file mode: %v %v", st.Mode(), err)
	}

	// Reopen on the same TPM, after a TPM restart (a reboot into the same state).
	v2, err := vtpm.OpenVault(ctx, tpmA, cfg)
	if err != nil {
		t.Fatalf("OpenVault on the sealing TPM: %v", err)
	}
	if v2.KeyID() != id {
		t.Fatalf("key ID changed: %s != %s", v2.KeyID(), id)
	}
	v2.Close()

	// A copy of the data directory on another host's TPM.
	copyDir := t.TempDir()
	if out, err := exec.Command("cp", "-a", dir+"/.", copyDir).CombinedOutput(); err != nil {
		t.Fatalf("copy: %v %s", err, out)
	}
	_, err = vtpm.OpenVault(ctx, tpmB, vtpm.VaultConfig{Dir: copyDir})
	if !errors.Is(err, vtpm.ErrWrongTPM) {
		t.Fatalf("OpenVault on another TPM: got %v, want ErrWrongTPM", err)
	}
	t.Logf("on another TPM: %v", err)

	// A changed boot state on the sealing TPM names the PCR.
	extendPCR(t, tpmA, 4, "a different boot loader")
	_, err = vtpm.OpenVault(ctx, tpmA, cfg)
	var pe *vtpm.PCRMismatchError
	if !errors.As(err, &pe) || !errors.Is(err, vtpm.ErrPCRMismatch) {
		t.Fatalf("OpenVault after extend: got %v, want *PCRMismatchError", err)
	}
	if got := pe.ChangedPCRs(); !slices.Equal(got, []int{4}) {
		t.Fatalf("changed PCRs = %v, want [4]", got)
	}
	if msg := err.Error(); !strings.Contains(msg, "PCR 4 changed") || !strings.Contains(msg, "vtpmd vault recover") {
		t.Fatalf("error does not name the PCR and the recovery: %q", msg)
	}
	t.Logf("after PCR extend: %v", err)
}

func TestVaultResealForPlannedUpdate(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, tpm := tpmtest.NewHost(t)
	cfg := vtpm.VaultConfig{Dir: t.TempDir(), PCRs: vtpm.PCRSelection{PCRs: []int{7, 9}}}
	v, err := vtpm.InitVault(ctx, tpm, cfg, vtpm.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	cur, err := vtpm.ReadPCRs(tpm, cfg.PCRs)
	if err != nil {
		t.Fatal(err)
	}
	// The update will extend PCR 9 once; predict it and reseal before "rebooting".
	pred := vtpm.PCRValues{7: cur[7], 9: predictExtend(cur[9], "new kernel")}
	if err := v.Reseal(ctx, tpm, vtpm.ResealOptions{Predicted: []vtpm.PCRValues{pred}}); err != nil {
		t.Fatalf("Reseal: %v", err)
	}
	if got := len(v.SealedTo()); got != 2 {
		t.Fatalf("slots after reseal = %d, want 2 (current + predicted)", got)
	}
	// Old state still opens.
	v1, err := vtpm.OpenVault(ctx, tpm, cfg)
	if err != nil {
		t.Fatalf("open in the old state: %v", err)
	}
	v1.Close()
	extendPCR(t, tpm, 9, "new kernel")
	v2, err := vtpm.OpenVault(ctx, tpm, cfg)
	if err != nil {
		t.Fatalf("open in the predicted state: %v", err)
	}
	if v2.KeyID() != v.KeyID() {
		t.Fatal("different key after reseal")
	}
	v2.Close()
	// Anything else is refused, and both slots report PCR 9.
	extendPCR(t, tpm, 9, "unplanned")
	_, err = vtpm.OpenVault(ctx, tpm, cfg)
	var pe *vtpm.PCRMismatchError
	if !errors.As(err, &pe) || len(pe.Slots) != 2 {
		t.Fatalf("unplanned state: got %v, want a mismatch on both slots", err)
	}
}

func TestVaultRecoveryKey(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, tpm := tpmtest.NewHost(t)
	cfg := vtpm.VaultConfig{Dir: t.TempDir(), PCRs: vtpm.PCRSelection{PCRs: []int{7}}}
	rk, err := vtpm.NewRecoveryKey(bytes.NewReader(bytes.Repeat([]byte{7}, 32)))
	if err != nil {
		t.Fatal(err)
	}
	v, err := vtpm.InitVault(ctx, tpm, cfg, vtpm.InitOptions{RecoveryKey: rk})
	if err != nil {
		t.Fatal(err)
	}
	id := v.KeyID()
	v.Close()
	extendPCR(t, tpm, 7, "secure boot db changed")
	if _, err := vtpm.OpenVault(ctx, tpm, cfg); !errors.Is(err, vtpm.ErrPCRMismatch) {
		t.Fatalf("got %v, want ErrPCRMismatch", err)
	}
	wrong, _ := vtpm.NewRecoveryKey(bytes.NewReader(bytes.Repeat([]byte{8}, 32)))
	if _, err := vtpm.RecoverVault(ctx, tpm, cfg, wrong); !errors.Is(err, vtpm.ErrRecoveryKey) {
		t.Fatalf("wrong recovery key: got %v, want ErrRecoveryKey", err)
	}
	parsed, err := vtpm.ParseRecoveryKey(rk.Reveal())
	if err != nil {
		t.Fatal(err)
	}
	rv, err := vtpm.RecoverVault(ctx, tpm, cfg, parsed)
	if err != nil {
		t.Fatalf("RecoverVault: %v", err)
	}
	if rv.KeyID() != id {
		t.Fatal("recovered a different key")
	}
	if err := rv.Reseal(ctx, tpm, vtpm.ResealOptions{}); err != nil {
		t.Fatalf("Reseal after recovery: %v", err)
	}
	rv.Close()
	v3, err := vtpm.OpenVault(ctx, tpm, cfg)
	if err != nil {
		t.Fatalf("open after recovery + reseal: %v", err)
	}
	v3.Close()
}

// TestRecoveryKeyZeroOctets: recovery keys whose v1 authValue would hold
// a zero octet (inside, which go-tpm's session cuts at; or at the end,
// which the TPM trims) open the vault, and the v2 authValue never holds
// one.
func TestRecoveryKeyZeroOctets(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	v1 := func(b []byte) [32]byte { return sha256.Sum256(append([]byte("vtpmm vault recovery v1\x00"), b...)) }
	var inner, trailing []byte
	for i := 0; i < 1<<16 && (inner == nil || trailing == nil); i++ {
		b := bytes.Repeat([]byte{byte(i), byte(i >> 8)}, 16)
		h := v1(b)
		if h[31] == 0 && trailing == nil {
			trailing = b
		}
		if bytes.IndexByte(h[:31], 0) >= 0 && h[31] != 0 && inner == nil {
			inner = b
		}
	}
	if inner == nil || trailing == nil {
		t.Fatal("no key with a zero octet in its v1 authValue found")
	}
	for i := 0; i < 1<<12; i++ {
		k := bytes.Repeat([]byte{byte(i), byte(i >> 8)}, 16)
		if got := vtpm.RecoveryAuthValue(k, "hex-v2"); len(got) != 32 || bytes.IndexByte(got, 0) >= 0 {
			t.Fatalf("v2 authValue %x: want 32 bytes without a zero octet", got)
		}
	}
	_, tpm := tpmtest.NewHost(t)
	for name, seed := range map[string][]byte{"zero inside": inner, "zero at the end": trailing} {
		cfg := vtpm.VaultConfig{Dir: t.TempDir(), PCRs: vtpm.PCRSelection{PCRs: []int{7}}}
		rk, _ := vtpm.NewRecoveryKey(bytes.NewReader(seed))
		v, err := vtpm.InitVault(ctx, tpm, cfg, vtpm.InitOptions{RecoveryKey: rk})
		if err != nil {
			t.Fatal(err)
		}
		v.Close()
		rv, err := vtpm.RecoverVault(ctx, tpm, cfg, rk)
		if err != nil {
			t.Fatalf("recovery key whose v1 authValue has a %s: %v", name, err)
		}
		rv.Close()
	}
}
