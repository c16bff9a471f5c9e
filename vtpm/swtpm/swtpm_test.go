package swtpm_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/internal/guestseal"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

const vmid = "6f1c7f0e-2b4a-4c1e-9a57-0d3c1b2a9e11"

func passphrase(t *testing.T) []byte {
	t.Helper()
	p := make([]byte, 32) // like a VM key: 32 random bytes, binary
	if _, err := rand.Read(p); err != nil {
		t.Fatal(err)
	}
	return p
}

// setup manufactures an encrypted vTPM in a fresh directory.
func setup(t *testing.T, pass []byte) string {
	t.Helper()
	dir := t.TempDir()
	state := filepath.Join(dir, "vm", "tpm2")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	t0 := time.Now()
	if err := swtpm.Setup(ctx, swtpm.SetupConfig{StateDir: state, VMID: vmid, VMName: "vm42", Passphrase: pass}); err != nil {
		t.Fatal(err)
	}
	t.Logf("swtpm_setup (encrypted, incl. CA) took %v", time.Since(t0))
	return state
}

// start starts swtpm and registers a cleanup that stops it.
func start(t *testing.T, state string, pass []byte) *swtpm.Process {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := swtpm.Start(ctx, swtpm.ProcessConfig{StateDir: state, Passphrase: pass})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Stop(context.Background()) })
	return p
}

func open(t *testing.T, p *swtpm.Process) transport.TPMCloser {
	t.Helper()
	tpm, err := vtpm.Open(context.Background(), p.DataURI())
	if err != nil {
		t.Fatal(err)
	}
	return tpm
}

func extend(t *testing.T, tpm transport.TPM, pcr int, data string) {
	t.Helper()
	d := sha256.Sum256([]byte(data))
	if _, err := (tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: d[:]}}},
	}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
}

func pcr(t *testing.T, tpm transport.TPM, i uint) []byte {
	t.Helper()
	r, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
		{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(i)}}}}.Execute(tpm)
	if err != nil || len(r.PCRValues.Digests) != 1 {
		t.Fatalf("PCR_Read(%d): %v", i, err)
	}
	return r.PCRValues.Digests[0].Buffer
}

func TestEncryptedAtRest(t *testing.T) {
	t.Parallel()
	pass := passphrase(t)
	state := setup(t, pass)
	if err := swtpm.CheckEncryptedAtRest(state); err != nil {
		t.Fatal(err)
	}
	perm, err := os.ReadFile(filepath.Join(state, "tpm2-00.permall"))
	if err != nil {
		t.Fatal(err)
	}
	h, err := swtpm.ParseHeader(perm)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("permall header: %+v", h)
	if h.Flags&swtpm.BlobFlagEncrypted256BitKey == 0 {
		t.Errorf("state not encrypted with a 256-bit key: flags %#x", h.Flags)
	}
	// The EK certificates in NV name the local CA; plaintext state would show it.
	if bytes.Contains(perm, []byte("swtpm-localca")) {
		t.Error("state file contains plaintext certificate data")
	}
	p := start(t, state, pass)
	ctx := context.Background()
	if err := p.Init(ctx); err != nil {
		t.Fatal(err)
	}
	// The passphrase never shows in argv, the environment or the log.
	for _, f := range []string{fmt.Sprintf("/proc/%d/cmdline", p.Pid()), fmt.Sprintf("/proc/%d/environ", p.Pid()), state + "-swtpm.log", state + "-swtpm_setup.log"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, pass) {
			t.Errorf("passphrase found in %s", f)
		}
	}
	caps, err := p.Ctrl().GetCapability(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []uint64{swtpm.CapInit, swtpm.CapShutdown, swtpm.CapGetStateBlob, swtpm.CapSetStateBlob, swtpm.CapStop, swtpm.CapGetConfig} {
		if caps&c == 0 {
			t.Errorf("capability %#x missing from %#x", c, caps)
		}
	}
	cfg, err := p.Ctrl().GetConfig(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if cfg&(swtpm.ConfigFileKey|swtpm.ConfigMigrationKey) != swtpm.ConfigFileKey|swtpm.ConfigMigrationKey {
		t.Errorf("GetConfig flags %#x: want file key and migration key", cfg)
	}
	tpm := open(t, p)
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
	extend(t, tpm, 16, "x")
	tpm.Close()
	// swtpm hands out state blobs only while the TPM runs.
	b, err := p.Ctrl().GetStateBlob(ctx, swtpm.BlobPermanent)
	if err != nil || !b.Encrypted {
		t.Fatalf("GetStateBlob = encrypted %v, %v", b.Encrypted, err)
	}
	if err := p.Ctrl().Stop(ctx); err != nil {
		t.Fatal(err)
	}
	var re *swtpm.ResultError
	if _, err := p.Ctrl().GetStateBlob(ctx, swtpm.BlobPermanent); !errors.As(err, &re) || re.Code != 0x0a {
		t.Errorf("GetStateBlob on a stopped TPM = %v, want TPM_BAD_ORDINAL", err)
	}
	if err := p.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	// State written while running is encrypted too.
	if err := swtpm.CheckEncryptedAtRest(state); err != nil {
		t.Fatal(err)
	}
	// Setup again does not overwrite.
	if err := swtpm.Setup(ctx, swtpm.SetupConfig{StateDir: state, VMID: vmid, Passphrase: pass}); err != nil {
		t.Fatal(err)
	}
	again, _ := os.ReadFile(filepath.Join(state, "tpm2-00.permall"))
	if len(again) == 0 {
		t.Fatal("state gone after second Setup")
	}
}

func TestWrongPassphrase(t *testing.T) {
	t.Parallel()
	pass := passphrase(t)
	state := setup(t, pass)
	for _, tc := range []struct {
		name string
		pass []byte
		want error
	}{
		{"other random key", passphrase(t), swtpm.ErrWrongPassphrase},
		{"one bit flipped", append([]byte{pass[0] ^ 1}, pass[1:]...), swtpm.ErrWrongPassphrase},
		{"right key", pass, nil},
	} {
		p := start(t, state, tc.pass)
		err := p.Init(context.Background())
		if !errors.Is(err, tc.want) {
			t.Fatalf("%s: Init = %v, want %v", tc.name, err, tc.want)
		}
		if err != nil {
			t.Logf("%s: %v", tc.name, err)
		}
		if err := p.Stop(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
}

func TestSealedSecretSurvives(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pass := passphrase(t)
	state := setup(t, pass)
	p := start(t, state, pass)
	if err := p.Init(ctx); err != nil {
		t.Fatal(err)
	}
	tpm := open(t, p)
	secret := []byte("tenant LUKS key")
	if err := guestseal.Seal(ctx, tpm, secret, []int{16}); err != nil {
		t.Fatal(err)
	}
	tpmtest.CheckNoLeaks(t, tpm)
	tpm.Close()

	// 1. Stop and start again on the same state.
	if err := p.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	p = start(t, state, pass)
	if err := p.Init(ctx); err != nil {
		t.Fatal(err)
	}
	tpm = open(t, p)
	got, err := guestseal.Unseal(ctx, tpm)
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("Unseal after restart = %q, %v", got, err)
	}
	extend(t, tpm, 15, "runtime measurement") // volatile state: must travel too
	pcr15 := pcr(t, tpm, 15)
	tpmtest.CheckNoLeaks(t, tpm)
	tpm.Close()

	// 2. Export from the running-but-stopped TPM, import into a fresh dir.
	t0 := time.Now()
	st, err := swtpm.ExportState(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ExportState: %d + %d bytes in %v, encrypted=%v", len(st.Permanent), len(st.Volatile), time.Since(t0), st.Encrypted)
	for _, b := range [][]byte{st.Permanent, st.Volatile} {
		h, err := swtpm.ParseHeader(b)
		if err != nil {
			t.Fatal(err)
		}
		if !h.Encrypted() {
			t.Errorf("exported blob header not encrypted: %+v", h)
		}
	}
	if err := p.Stop(ctx); err != nil {
		t.Fatal(err)
	}

	// Wrong passphrase at the destination.
	bad := start(t, filepath.Join(t.TempDir(), "tpm2"), passphrase(t))
	err = swtpm.ImportState(ctx, bad, st)
	if err == nil {
		err = bad.Init(ctx)
	}
	if !errors.Is(err, swtpm.ErrWrongPassphrase) {
		t.Fatalf("import with the wrong passphrase = %v, want ErrWrongPassphrase", err)
	}
	t.Logf("wrong passphrase on import: %v", err)

	dst := filepath.Join(t.TempDir(), "tpm2")
	if err := os.MkdirAll(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	q := start(t, dst, pass)
	t0 = time.Now()
	if err := swtpm.ImportState(ctx, q, st); err != nil {
		t.Fatal(err)
	}
	if err := q.Init(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("ImportState + Init took %v", time.Since(t0))
	tpm = open(t, q)
	defer tpm.Close()
	got, err = guestseal.Unseal(ctx, tpm)
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("Unseal after import = %q, %v", got, err)
	}
	if now := pcr(t, tpm, 15); !bytes.Equal(now, pcr15) {
		t.Errorf("PCR 15 after import = %x, want %x (volatile state lost)", now, pcr15)
	}
	tpmtest.CheckNoLeaks(t, tpm)
	if err := swtpm.CheckEncryptedAtRest(dst); err != nil {
		t.Error(err)
	}
}

func TestConfigErrors(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		cfg  swtpm.SetupConfig
	}{
		{"no passphrase", swtpm.SetupConfig{StateDir: dir, VMID: vmid}},
		{"bad uuid", swtpm.SetupConfig{StateDir: dir, VMID: "vm42", Passphrase: []byte("p")}},
		{"comma in path", swtpm.SetupConfig{StateDir: dir + "/a,b", VMID: vmid, Passphrase: []byte("p")}},
	} {
		if err := swtpm.Setup(ctx, tc.cfg); !errors.Is(err, swtpm.ErrBadConfig) {
			t.Errorf("%s: Setup = %v, want ErrBadConfig", tc.name, err)
		}
	}
	if _, err := swtpm.Start(ctx, swtpm.ProcessConfig{StateDir: dir}); !errors.Is(err, swtpm.ErrBadConfig) {
		t.Errorf("Start without passphrase = %v, want ErrBadConfig", err)
	}
}
