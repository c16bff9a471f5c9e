package host_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/emuhost"
	"github.com/vtpmm/vtpmm/vtpm/host"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// recordingRand hands out crypto/rand bytes and remembers every 32-byte
// draw: those are the vault key and the VM keys.
type recordingRand struct {
	mu    sync.Mutex
	draws [][]byte
}

func (r *recordingRand) Read(p []byte) (int, error) {
	n, err := rand.Read(p)
	if len(p) == 32 {
		r.mu.Lock()
		r.draws = append(r.draws, bytes.Clone(p))
		r.mu.Unlock()
	}
	return n, err
}

func testConfig(t *testing.T, h *emuhost.Host) host.Config {
	cfg := host.DefaultConfig()
	cfg.HostID = "host-a"
	cfg.DataDir = filepath.Join(t.TempDir(), "data")
	cfg.RunDir = shortRunDir(t)
	cfg.TPM = h.URI()
	return cfg
}

// shortRunDir keeps unix socket paths under 108 bytes.
func shortRunDir(t *testing.T) string {
	d, err := os.MkdirTemp("/tmp", "vtpmm-run-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func TestAgentLifecycleAndNoPlaintextKeys(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := tpmtest.StartHost(t)
	cfg := testConfig(t, h)
	var logs bytes.Buffer
	log := logrus.New()
	log.SetOutput(&logs)
	log.SetFormatter(&logrus.JSONFormatter{})
	log.SetLevel(logrus.TraceLevel)
	rr := &recordingRand{}
	opts := host.Options{Log: log, Rand: rr}

	if _, err := host.Init(ctx, cfg, opts, host.InitOptions{}); err != nil {
		t.Fatalf("Init: %v", err)
	}
	a, err := host.Open(ctx, cfg, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = a.Close(ctx) })
	var vms []host.VM
	for _, name := range []string{"vm1", "vm2"} {
		vm, err := a.CreateVM(ctx, name, "")
		if err != nil {
			t.Fatalf("CreateVM %s: %v", name, err)
		}
		vms = append(vms, vm)
	}
	if _, err := a.CreateVM(ctx, "vm1", ""); !errors.Is(err, host.ErrVMExists) {
		t.Fatalf("duplicate CreateVM: %v", err)
	}
	// The source side opens a VM key with no TPM command.
	before := a.Meter().Stats()
	if _, _, err := a.Keys().Get(ctx, vms[0].UUID); err != nil {
		t.Fatal(err)
	}
	if d := a.Meter().Stats().Sub(before); d.Total != 0 {
		t.Fatalf("opening a VM key cost %d TPM commands (%s), want 0", d.Total, d)
	}
	st, err := a.StartVM(ctx, "vm1")
	if err != nil {
		t.Fatalf("StartVM: %v", err)
	}
	vt, err := vtpm.Open(ctx, st.SocketURI)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(vt); err != nil {
		t.Fatalf("vTPM does not answer: %v", err)
	}
	vt.Close()
	// Collect every form of every key before closing.
	secrets := map[string][]byte{}
	for i, d := range rr.draws {
		secrets["random draw "+string(rune('0'+i))] = d
	}
	for _, vm := range vms {
		if _, err := a.Keys().WithPassphrase(ctx, vm.UUID, func(p []byte) error {
			raw, err := hex.DecodeString(string(p))
			secrets["VM key "+vm.Name] = raw
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	if len(secrets) < 3 {
		t.Fatalf("expected the vault key and two VM keys among the recorded draws, got %d", len(secrets))
	}
	if err := a.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}

	// Restart: the vault opens again, the vTPM starts on its encrypted state.
	a2, err := host.Open(ctx, cfg, opts)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	t.Cleanup(func() { _ = a2.Close(ctx) })
	if _, err := a2.StartVM(ctx, vms[1].UUID); err != nil {
		t.Fatalf("StartVM after restart: %v", err)
	}
	list, err := a2.ListVMs(ctx)
	if err != nil || len(list) != 2 || list[0].Generation != 1 || !list[1].Running {
		t.Fatalf("ListVMs: %+v %v", list, err)
	}
	if err := a2.Close(ctx); err != nil {
		t.Fatal(err)
	}

	// G1: no key in any form in any file the host wrote, nor in its logs.
	blobs := map[string][]byte{"log output": logs.Bytes()}
	for _, dir := range []string{cfg.DataDir, cfg.RunDir} {
		_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				b, rerr := os.ReadFile(p)
				if rerr == nil {
					blobs[p] = b
				}
			}
			return nil
		})
	}
	if len(blobs) < 8 {
		t.Fatalf("scanned only %d files; the scan is not looking where the host writes", len(blobs))
	}
	for where, b := range blobs {
		for name, key := range secrets {
			for form, enc := range encodings(key) {
				if bytes.Contains(b, enc) {
					t.Errorf("G1 violated: %s (%s) found in %s", name, form, where)
				}
			}
		}
	}
	t.Logf("G1 scan: %d secrets x 7 encodings over %d files and %d bytes of logs", len(secrets), len(blobs)-1, logs.Len())
}

func encodings(k []byte) map[string][]byte {
	h := hex.EncodeToString(k)
	return map[string][]byte{
		"raw":        k,
		"hex":        []byte(h),
		"HEX":        []byte(strings.ToUpper(h)),
		"base64":     []byte(base64.StdEncoding.EncodeToString(k)),
		"base64-raw": []byte(base64.RawStdEncoding.EncodeToString(k)),
		"base64url":  []byte(base64.RawURLEncoding.EncodeToString(k)),
		"raw-prefix": k[:16],
	}
}

func TestAgentRefusesCopiedDataDir(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	hA, hB := tpmtest.StartHost(t), tpmtest.StartHost(t)
	cfg := testConfig(t, hA)
	if _, err := host.Init(ctx, cfg, host.Options{}, host.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	cfgB := cfg
	cfgB.TPM = hB.URI()
	_, err := host.Open(ctx, cfgB, host.Options{})
	if !errors.Is(err, vtpm.ErrWrongTPM) {
		t.Fatalf("copied data dir on another TPM: got %v, want ErrWrongTPM", err)
	}
	cfgC := cfg
	cfgC.HostID = "host-c"
	if _, err := host.Open(ctx, cfgC, host.Options{}); !errors.Is(err, host.ErrConfig) {
		t.Fatalf("data dir of another host ID: got %v, want ErrConfig", err)
	}
}

func TestConfigValidation(t *testing.T) {
	tests := []struct {
		name string
		mod  func(*host.Config)
		want string
	}{
		{"defaults", func(*host.Config) {}, ""},
		{"relative data dir", func(c *host.Config) { c.DataDir = "data" }, "data_dir"},
		{"bad profile", func(c *host.Config) { c.TPMProfile = "slow" }, "tpm_profile"},
		{"bad pcrs", func(c *host.Config) { c.Vault.PCRs = "7,99" }, "vault.pcrs"},
		{"bad srk", func(c *host.Config) { c.Vault.SRKHandle = "0x80000001" }, "vault.srk_handle"},
		{"host id with slash", func(c *host.Config) { c.HostID = "a/b" }, "host_id"},
		{"comma in data dir", func(c *host.Config) { c.DataDir = "/var/lib/a,b" }, "data_dir"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := host.DefaultConfig()
			c.HostID = "h"
			tc.mod(&c)
			err := c.Validate()
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(err, host.ErrConfig) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrConfig naming %s", err, tc.want)
			}
		})
	}
}
