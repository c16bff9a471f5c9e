package identity_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/internal/fixtures"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/emuhost"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// Real event logs: a GCE COS boot (Secure Boot on) is the known-good
// boot; Ubuntu 21.04 (Secure Boot off) is "another" boot of the host.
const (
	goodLog  = "eventlogs/gce-cos-85.eventlog.bin"
	otherLog = "eventlogs/ubuntu-2104-no-secure-boot.bin"
)

var quoted = []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}

// readFile reads a shared fixture (internal/fixtures) or, for any other
// path, a file.
func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := fixtures.File(path)
	if err != nil {
		b, err = os.ReadFile(path)
	}
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// host is an emulated host TPM that can be rebooted. Cleanup checks for
// leaked handles, closes the connection and stops swtpm.
type host struct {
	t   testing.TB
	emu *emuhost.Host
	tpm transport.TPMCloser
}

func newHost(t testing.TB, name string) *host {
	t.Helper()
	if err := emuhost.Available(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dir, err := os.MkdirTemp("/tmp", "identity-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	emu, err := emuhost.Start(ctx, emuhost.Config{Dir: filepath.Join(dir, "h"), Name: name})
	if err != nil {
		t.Fatal(err)
	}
	h := &host{t: t, emu: emu}
	t.Cleanup(func() {
		if h.tpm != nil {
			tpmtest.CheckNoLeaks(t, h.tpm)
			_ = h.tpm.Close()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := emu.Stop(ctx); err != nil {
			t.Errorf("stop %s: %v", name, err)
		}
	})
	h.open()
	return h
}

func (h *host) open() {
	h.t.Helper()
	tpm, err := vtpm.Open(context.Background(), h.emu.URI())
	if err != nil {
		h.t.Fatal(err)
	}
	h.tpm = tpm
}

// boot reboots the host (fresh PCRs) and extends the event log into them.
func (h *host) boot(log []byte) {
	h.t.Helper()
	tpmtest.CheckNoLeaks(h.t, h.tpm)
	_ = h.tpm.Close()
	h.tpm = nil
	if err := h.emu.Restart(context.Background()); err != nil {
		h.t.Fatal(err)
	}
	h.open()
	if err := emuhost.BootTPM(context.Background(), h.tpm, log, h.emu.PCRBanks()); err != nil {
		h.t.Fatal(err)
	}
}

// roots trusts this host's local CA (root and intermediate).
func (h *host) roots(t testing.TB) *attest.RootStore {
	t.Helper()
	s := attest.NewRootStore()
	h.addRoots(t, s)
	return s
}

// addRoots adds this host's local CA to s.
func (h *host) addRoots(t testing.TB, s *attest.RootStore) {
	t.Helper()
	tpmtest.TrustHostCA(t, s, h.emu)
}

func goodPolicy(t testing.TB) *attest.Policy {
	t.Helper()
	l, err := attest.ParseEventLog(readFile(t, goodLog))
	if err != nil {
		t.Fatal(err)
	}
	p, err := attest.GoldenFromEventLog(l, "sha256", quoted)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func fixedClock(t time.Time) func() time.Time { return func() time.Time { return t } }
