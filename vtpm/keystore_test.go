package vtpm_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

const vm1 = "0e2e0e2e-0000-4000-8000-000000000001"

// newKeyStore makes a key store for host on a new vault of a new emulated
// TPM; everything is closed when the test ends.
func newKeyStore(t *testing.T, host string) (*vtpm.KeyStore, *vtpm.Vault, string) {
	t.Helper()
	_, tpm := tpmtest.NewHost(t)
	dir := t.TempDir()
	v, err := vtpm.InitVault(context.Background(), tpm, vtpm.VaultConfig{Dir: dir}, vtpm.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	ks, err := vtpm.NewKeyStore(dir, host, v, nil)
	if err != nil {
		t.Fatal(err)
	}
	return ks, v, dir
}

func TestKeyStoreLifecycle(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	ks, v, dir := newKeyStore(t, "host-a")
	k, gen, err := ks.Create(ctx, vm1)
	if err != nil || gen != 1 {
		t.Fatalf("Create: gen %d, %v", gen, err)
	}
	if _, _, err := ks.Create(ctx, vm1); !errors.Is(err, vtpm.ErrKeyExists) {
		t.Fatalf("second Create: %v", err)
	}
	got, g2, err := ks.Get(ctx, vm1)
	if err != nil || g2 != 1 || !got.Equal(k) {
		t.Fatalf("Get: gen %d equal %v err %v", g2, got.Equal(k), err)
	}
	st, err := os.Stat(filepath.Join(dir, "keys", vm1+".key"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v, %v", st.Mode(), err)
	}
	// Generations only go up.
	if err := ks.Put(ctx, vm1, 1, k); !errors.Is(err, vtpm.ErrStaleGeneration) {
		t.Fatalf("Put at the same generation: %v", err)
	}
	if err := ks.Put(ctx, vm1, 5, k); err != nil {
		t.Fatalf("Put gen 5: %v", err)
	}
	if err := ks.Delete(ctx, vm1); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, _, err := ks.Get(ctx, vm1); !errors.Is(err, vtpm.ErrKeyNotFound) {
		t.Fatalf("Get after delete: %v", err)
	}
	// The high-water mark outlives the key: an old copy is never taken back.
	if err := ks.Put(ctx, vm1, 4, k); !errors.Is(err, vtpm.ErrStaleGeneration) {
		t.Fatalf("Put of a stale generation after delete: %v", err)
	}
	if _, gen, err := ks.Create(ctx, vm1); err != nil || gen != 6 {
		t.Fatalf("re-Create: gen %d, %v", gen, err)
	}
	list, err := ks.List(ctx)
	if err != nil || len(list) != 1 || list[0].Generation != 6 || list[0].KeyID != v.KeyID() {
		t.Fatalf("List: %+v %v", list, err)
	}
}

func TestEnvelopeBindings(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, tpm := tpmtest.NewHost(t)
	v, err := vtpm.InitVault(ctx, tpm, vtpm.VaultConfig{Dir: t.TempDir()}, vtpm.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	other, err := vtpm.InitVault(ctx, tpm, vtpm.VaultConfig{Dir: t.TempDir()}, vtpm.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	k, _ := vtpm.NewVMKey(nil2rand{})
	env, err := v.SealVMKey("host-a", vm1, 3, k)
	if err != nil {
		t.Fatal(err)
	}
	tamper := func(f func(e *vtpm.Envelope)) *vtpm.Envelope {
		c := *env
		c.Ciphertext = append([]byte(nil), env.Ciphertext...)
		f(&c)
		return &c
	}
	tests := []struct {
		name  string
		vault *vtpm.Vault
		env   *vtpm.Envelope
		host  string
		vm    string
		want  error
	}{
		{"ok", v, env, "host-a", vm1, nil},
		{"other vault", other, env, "host-a", vm1, vtpm.ErrWrongKey},
		{"other host", v, env, "host-b", vm1, vtpm.ErrWrongKey},
		{"other VM", v, env, "host-a", "0e2e0e2e-0000-4000-8000-000000000002", vtpm.ErrWrongKey},
		{"generation rolled back", v, tamper(func(e *vtpm.Envelope) { e.Generation = 2 }), "host-a", vm1, vtpm.ErrCorrupt},
		{"flipped ciphertext bit", v, tamper(func(e *vtpm.Envelope) { e.Ciphertext[0] ^= 1 }), "host-a", vm1, vtpm.ErrCorrupt},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.vault.OpenVMKey(tc.env, tc.host, tc.vm)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if err == nil && !got.Equal(k) {
				t.Fatal("opened a different key")
			}
			if err != nil {
				t.Logf("%v", err)
			}
		})
	}
	v.Close()
	if _, err := v.OpenVMKey(env, "host-a", vm1); !errors.Is(err, vtpm.ErrVaultLocked) {
		t.Fatalf("after Close: %v", err)
	}
}

type nil2rand struct{}

func (nil2rand) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(i*7 + 3)
	}
	return len(p), nil
}

func TestSecretsRefuseToPrintOrMarshal(t *testing.T) {
	k, err := vtpm.NewVMKey(nil2rand{})
	if err != nil {
		t.Fatal(err)
	}
	var pass string
	_ = k.WithPassphrase(func(p []byte) error { pass = string(p); return nil })
	for _, s := range []string{fmt.Sprint(k), fmt.Sprintf("%v %+v %#v %s %x %q", k, k, k, k, k, k), fmt.Sprintf("%v", &k)} {
		if s == "" || containsAny(s, pass, pass[:16]) {
			t.Fatalf("key material printed: %q", s)
		}
	}
	if _, err := json.Marshal(k); !errors.Is(err, vtpm.ErrSecretMarshal) {
		t.Fatalf("json.Marshal(VMKey): %v", err)
	}
	if _, err := json.Marshal(struct{ K vtpm.VMKey }{k}); !errors.Is(err, vtpm.ErrSecretMarshal) {
		t.Fatalf("json.Marshal(struct with VMKey): %v", err)
	}
	rk, _ := vtpm.NewRecoveryKey(nil2rand{})
	if s := fmt.Sprintf("%v %s %+v", rk, rk, rk); containsAny(s, rk.Reveal()[:8]) {
		t.Fatalf("recovery key printed: %q", s)
	}
	if _, err := json.Marshal(rk); !errors.Is(err, vtpm.ErrSecretMarshal) {
		t.Fatalf("json.Marshal(RecoveryKey): %v", err)
	}
	if len(pass) != 64 {
		t.Fatalf("passphrase is %d chars, want 64 hex", len(pass))
	}
	k.Destroy()
}

func containsAny(s string, subs ...string) bool {
	for _, sub := range subs {
		if sub != "" && strings.Contains(s, sub) {
			return true
		}
	}
	return false
}

func TestKeyStorePending(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	ks, _, _ := newKeyStore(t, "host-b")
	k, _ := vtpm.NewVMKey(nil)
	const tx1, tx2 = "00112233aabbccdd", "99887766aabbccdd"
	if err := ks.PutPending(ctx, vm1, tx1, 2, k); err != nil {
		t.Fatal(err)
	}
	if err := ks.PutPending(ctx, vm1, tx2, 2, k); !errors.Is(err, vtpm.ErrKeyExists) {
		t.Fatalf("second pending key under another transaction: %v", err)
	}
	if _, _, err := ks.Get(ctx, vm1); !errors.Is(err, vtpm.ErrKeyNotFound) {
		t.Fatalf("a pending key must not be the VM's key: %v", err)
	}
	// Abort: nothing is left, and the generation is not burnt.
	if err := ks.DropPending(ctx, vm1, tx1); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ks.GetPending(ctx, vm1, tx1); !errors.Is(err, vtpm.ErrKeyNotFound) {
		t.Fatalf("pending after drop: %v", err)
	}
	if err := ks.PutPending(ctx, vm1, tx2, 2, k); err != nil {
		t.Fatalf("retry at the same generation after an abort: %v", err)
	}
	got, gen, err := ks.GetPending(ctx, vm1, tx2)
	if err != nil || gen != 2 || !got.Equal(k) {
		t.Fatalf("GetPending: %d %v", gen, err)
	}
	if gen, err := ks.CommitPending(ctx, vm1, tx2); err != nil || gen != 2 {
		t.Fatalf("CommitPending: %d %v", gen, err)
	}
	if _, gen, err := ks.Get(ctx, vm1); err != nil || gen != 2 {
		t.Fatalf("Get after commit: %d %v", gen, err)
	}
	if err := ks.PutPending(ctx, vm1, tx1, 2, k); !errors.Is(err, vtpm.ErrStaleGeneration) {
		t.Fatalf("pending at a committed generation: %v", err)
	}
	if err := ks.PutPending(ctx, vm1, "NOT-HEX", 3, k); !errors.Is(err, vtpm.ErrCorrupt) {
		t.Fatalf("bad tx id: %v", err)
	}
}

// TestKeyStoreRefusesRestoredOldCopy: an old envelope restored over a newer
// one is never opened (G3: a stale copy is never started).
func TestKeyStoreRefusesRestoredOldCopy(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	ks, _, dir := newKeyStore(t, "host-a")
	k, _, err := ks.Create(ctx, vm1)
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(dir, "keys", vm1+".key")
	old, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := ks.Put(ctx, vm1, 2, k); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, old, 0o600); err != nil { // an operator restores a backup
		t.Fatal(err)
	}
	if _, _, err := ks.Get(ctx, vm1); !errors.Is(err, vtpm.ErrStaleGeneration) {
		t.Fatalf("Get of a restored generation-1 copy after generation 2: %v", err)
	}
}
