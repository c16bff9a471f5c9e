//go:build cgo

package tpmsim_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/tpmsim"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// TestVaultOnSimulator runs the vault on a second TPM implementation (the
// Microsoft reference TPM) and checks the meter's counts and injected
// latency against it.
func TestVaultOnSimulator(t *testing.T) {
	ctx := context.Background()
	raw, err := vtpm.Open(ctx, "simulator://?seed=7", tpmsim.Option())
	if err != nil {
		t.Fatalf("open simulator: %v", err)
	}
	var slept time.Duration
	m := vtpm.NewMeter(raw, vtpm.ProfileDTPM, vtpm.WithSleep(func(d time.Duration) { slept += d }))
	defer m.Close()
	defer tpmtest.CheckNoLeaks(t, raw)

	cfg := vtpm.VaultConfig{Dir: t.TempDir(), PCRs: vtpm.PCRSelection{PCRs: []int{7}}}
	v, err := vtpm.InitVault(ctx, m, cfg, vtpm.InitOptions{})
	if err != nil {
		t.Fatalf("InitVault: %v", err)
	}
	v.Close()
	m.Reset()
	slept = 0
	v, err = vtpm.OpenVault(ctx, m, cfg)
	if err != nil {
		t.Fatalf("OpenVault: %v", err)
	}
	v.Close()
	st := m.Stats()
	want := map[tpm2.TPMCC]int{
		tpm2.TPMCCReadPublic: 1, tpm2.TPMCCPCRRead: 1, tpm2.TPMCCStartAuthSession: 1, tpm2.TPMCCPolicyPCR: 1,
		tpm2.TPMCCLoad: 1, tpm2.TPMCCUnseal: 1, tpm2.TPMCCFlushContext: 1,
	}
	if st.Total != 7 || len(st.ByCode) != len(want) {
		t.Fatalf("open vault ran %s, want one each of ReadPublic PCR_Read StartAuthSession PolicyPCR Load Unseal FlushContext", st)
	}
	for cc, n := range want {
		if st.ByCode[cc] != n {
			t.Errorf("%s: %d, want %d", vtpm.CommandName(cc), st.ByCode[cc], n)
		}
	}
	// Seven handle-class commands at 50 ms each.
	if st.Injected != 350*time.Millisecond || slept != st.Injected {
		t.Fatalf("injected %v, slept %v, want 350ms both", st.Injected, slept)
	}
	if _, err := vtpm.Open(ctx, "simulator://?seed=x", tpmsim.Option()); !errors.Is(err, vtpm.ErrBadURI) && !errors.Is(err, vtpm.ErrTPMUnavailable) {
		t.Fatalf("bad seed: %v", err)
	}
}
