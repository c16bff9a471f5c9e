// Package tpmtest owns test helpers for TPMs: leak checks for the handle
// slots of TPMs without a resource manager (swtpm has 3 object slots and a
// leaked handle outlives the connection), and emulated hosts that clean up
// after themselves.
package tpmtest

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/emuhost"
)

// Handle ranges checked by CheckNoLeaks (TPM_HT_* << 24).
const (
	TransientFirst     tpm2.TPMHandle = 0x80000000
	LoadedSessionFirst tpm2.TPMHandle = 0x02000000
	SavedSessionFirst  tpm2.TPMHandle = 0x03000000
)

// Handles lists the handles the TPM reports for the handle type of first
// (TPM_CAP_HANDLES), following moreData.
func Handles(tpm transport.TPM, first tpm2.TPMHandle) ([]tpm2.TPMHandle, error) {
	var out []tpm2.TPMHandle
	next := first
	for {
		r, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: uint32(next), PropertyCount: 64}.Execute(tpm)
		if err != nil {
			return nil, fmt.Errorf("GetCapability(handles %#x): %w", first, err)
		}
		hs, err := r.CapabilityData.Data.Handles()
		if err != nil {
			return nil, fmt.Errorf("GetCapability(handles %#x): %w", first, err)
		}
		// The TPM answers with handles of the requested type only; loaded
		// policy sessions are reported with their 0x03 handles.
		out = append(out, hs.Handle...)
		if !r.MoreData || len(hs.Handle) == 0 {
			return out, nil
		}
		next = hs.Handle[len(hs.Handle)-1] + 1
	}
}

// Leaks returns every transient object, loaded session and saved session
// the TPM holds.
func Leaks(tpm transport.TPM) ([]tpm2.TPMHandle, error) {
	var all []tpm2.TPMHandle
	seen := map[tpm2.TPMHandle]bool{}
	for _, first := range []tpm2.TPMHandle{TransientFirst, LoadedSessionFirst, SavedSessionFirst} {
		hs, err := Handles(tpm, first)
		if err != nil {
			return nil, err
		}
		for _, h := range hs {
			if !seen[h] {
				seen[h] = true
				all = append(all, h)
			}
		}
	}
	return all, nil
}

// CheckNoLeaks fails the test if the TPM holds any transient object, loaded
// session or saved session, listing each leaked handle.
func CheckNoLeaks(t testing.TB, tpm transport.TPM) {
	t.Helper()
	leaks, err := Leaks(tpm)
	if err != nil {
		t.Errorf("tpmtest: leak check: %v", err)
		return
	}
	for _, h := range leaks {
		t.Errorf("tpmtest: leaked TPM handle %#08x (%s)", uint32(h), kind(h))
	}
}

func kind(h tpm2.TPMHandle) string {
	switch h >> 24 {
	case 0x80:
		return "transient object"
	case 0x02:
		return "HMAC session"
	case 0x03:
		return "policy session"
	}
	return "handle"
}

// StartHost starts an emulated host TPM for the test (own swtpm, own CA,
// state in a temporary directory) without connecting to it, and registers
// cleanup that connects, checks for leaked handles and stops swtpm, even when
// the test fails. Use it when the code under test opens the TPM itself:
// swtpm serves one data connection at a time, a second one waits.
func StartHost(t testing.TB) *emuhost.Host {
	t.Helper()
	h := startHost(t)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if tpm, err := vtpm.Open(ctx, h.URI()); err != nil {
			t.Errorf("tpmtest: leak check: %v", err)
		} else {
			CheckNoLeaks(t, tpm)
			_ = tpm.Close()
		}
		if err := h.Stop(ctx); err != nil {
			t.Errorf("tpmtest: stop host: %v", err)
		}
	})
	return h
}

// NewHost starts an emulated host TPM for the test (own swtpm, own CA, state
// in a temporary directory), opens it with vtpm.Open and registers cleanup
// that checks for leaked handles, closes the connection and stops swtpm, even
// when the test fails. It fails the test if swtpm is not installed. Keep the
// returned connection the only one: swtpm serves one at a time.
func NewHost(t testing.TB) (*emuhost.Host, transport.TPMCloser) {
	t.Helper()
	h := startHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	tpm, err := vtpm.Open(ctx, h.URI())
	if err != nil {
		_ = h.Stop(ctx)
		t.Fatalf("tpmtest: %v", err)
	}
	t.Cleanup(func() {
		CheckNoLeaks(t, tpm)
		_ = tpm.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := h.Stop(ctx); err != nil {
			t.Errorf("tpmtest: stop host: %v", err)
		}
	})
	return h, tpm
}

func startHost(t testing.TB) *emuhost.Host {
	t.Helper()
	if err := emuhost.Available(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// Not t.TempDir(): subtest names may put ',' into the path, which swtpm's
	// option syntax cannot carry, and long paths break unix sockets.
	dir, err := os.MkdirTemp("/tmp", "tpmtest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	h, err := emuhost.Start(ctx, emuhost.Config{Dir: dir, Name: "test-host"})
	if err != nil {
		t.Fatalf("tpmtest: %v", err)
	}
	t.Logf("tpmtest: emulated host TPM at %s (manufactured in %v)", h.URI(), h.ProvisionTime())
	return h
}
