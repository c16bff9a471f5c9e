package tpmtest

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/vtpm/emuhost"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// TrustHostCA adds an emulated host's local CA (root and intermediate) to a
// verifier's root store, as an operator trusts a TPM vendor.
func TrustHostCA(t testing.TB, roots *attest.RootStore, h *emuhost.Host) {
	t.Helper()
	for _, p := range []string{h.RootCAPath(), h.IntermediateCAPath()} {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		cs, err := attest.ParseCertificates(b)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range cs {
			roots.Add(c, h.Name()+"/"+filepath.Base(p))
		}
	}
}

// Enrol runs credential activation against the host's EK on its TPM (the
// verifier's challenge, the TPM's ActivateCredential, the comparison) and
// records the enrolment, as Node.Enroll does over the wire.
func Enrol(t testing.TB, tpm transport.TPM, id *identity.Identity, host string, enr attest.Enrollments) {
	t.Helper()
	ctx := context.Background()
	ch, err := attest.NewActivationChallenge(rand.Reader, id.EK.Public, id.AK.Public)
	if err != nil {
		t.Fatal(err)
	}
	answer, err := identity.ActivateCredential(ctx, tpm, id, ch)
	if err != nil {
		t.Fatal(err)
	}
	if err := attest.VerifyActivation(ch, answer); err != nil {
		t.Fatal(err)
	}
	if err := enr.Add(ctx, ch.Enrollment(host, time.Now())); err != nil {
		t.Fatal(err)
	}
}
