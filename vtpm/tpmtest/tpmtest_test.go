package tpmtest_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// recorder captures Errorf so a leak can be asserted without failing the test.
type recorder struct {
	testing.TB
	errs []string
}

func (r *recorder) Helper() {}
func (r *recorder) Errorf(format string, args ...any) {
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}

func TestCheckNoLeaks(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		leak  func(t *testing.T, tpm interface{ Send([]byte) ([]byte, error) }) []tpm2.TPMHandle
		wants []string
	}{
		{
			name: "clean",
			leak: func(*testing.T, interface{ Send([]byte) ([]byte, error) }) []tpm2.TPMHandle { return nil },
		},
		{
			name: "object and session",
			leak: func(t *testing.T, tpm interface{ Send([]byte) ([]byte, error) }) []tpm2.TPMHandle {
				p, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}.Execute(tpm)
				if err != nil {
					t.Fatal(err)
				}
				s, err := tpm2.StartAuthSession{
					TPMKey: tpm2.TPMRHNull, Bind: tpm2.TPMRHNull, SessionType: tpm2.TPMSEPolicy,
					Symmetric: tpm2.TPMTSymDef{Algorithm: tpm2.TPMAlgNull}, AuthHash: tpm2.TPMAlgSHA256,
					NonceCaller: tpm2.TPM2BNonce{Buffer: make([]byte, 16)},
				}.Execute(tpm)
				if err != nil {
					t.Fatal(err)
				}
				return []tpm2.TPMHandle{p.ObjectHandle, s.SessionHandle}
			},
			wants: []string{"transient object", "policy session"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, tpm := tpmtest.NewHost(t)
			leaked := tc.leak(t, tpm)
			r := &recorder{TB: t}
			tpmtest.CheckNoLeaks(r, tpm)
			if len(r.errs) != len(tc.wants) {
				t.Fatalf("CheckNoLeaks reported %q, want %d leaks", r.errs, len(tc.wants))
			}
			for i, w := range tc.wants {
				if !strings.Contains(r.errs[i], w) || !strings.Contains(r.errs[i], fmt.Sprintf("%#08x", uint32(leaked[i]))) {
					t.Errorf("report %q does not name %s %#x", r.errs[i], w, leaked[i])
				}
			}
			for _, h := range leaked {
				if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(tpm); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}
