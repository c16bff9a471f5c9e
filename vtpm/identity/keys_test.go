package identity_test

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

func TestProvisionIsIdempotent(t *testing.T) {
	t.Parallel()
	_, tpm := tpmtest.NewHost(t)
	ctx := context.Background()
	m := vtpm.NewMeter(tpm, vtpm.ProfileNone)

	if _, err := identity.LoadIdentity(ctx, m, identity.LoadOptions{}); !errors.Is(err, identity.ErrNotProvisioned) {
		t.Fatalf("LoadIdentity before Provision = %v, want ErrNotProvisioned", err)
	}
	before := m.Stats()
	id, err := identity.Provision(ctx, m, identity.ProvisionOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cold := m.Stats().Sub(before)
	t.Logf("cold provision: %d TPM commands (%s)", cold.Total, cold)
	if cold.ByCode[tpm2.TPMCCCreate] != 2 || cold.ByCode[tpm2.TPMCCEvictControl] != 3 {
		t.Errorf("cold provision ran %s, want 2 Create and 3 EvictControl (SRK, AK, MK)", cold)
	}

	before = m.Stats()
	again, err := identity.Provision(ctx, m, identity.ProvisionOptions{})
	if err != nil {
		t.Fatal(err)
	}
	warm := m.Stats().Sub(before)
	t.Logf("provision again: %d TPM commands (%s)", warm.Total, warm)
	for _, cc := range []tpm2.TPMCC{tpm2.TPMCCCreatePrimary, tpm2.TPMCCCreate, tpm2.TPMCCEvictControl} {
		if warm.ByCode[cc] != 0 {
			t.Errorf("second Provision ran %s", warm)
		}
	}
	if !bytes.Equal(id.AK.Name, again.AK.Name) || !bytes.Equal(id.MK.Name, again.MK.Name) {
		t.Error("a second Provision changed the AK or MK")
	}
	if id.AK.Handle != identity.DefaultAKHandle || id.MK.Handle != identity.DefaultMKHandle {
		t.Errorf("handles AK %#x MK %#x", id.AK.Handle, id.MK.Handle)
	}

	// The public areas are what the verifier expects, and their names are
	// the TPM's names.
	for _, k := range []struct {
		what string
		key  identity.Key
	}{{"EK", id.EK.Key}, {"AK", id.AK}, {"MK", id.MK}} {
		p, err := attest.ParsePublic(k.what, k.key.Public)
		if err != nil {
			t.Fatal(err)
		}
		n, err := p.Name()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(n, k.key.Name) {
			t.Errorf("%s: name of the public area %x, TPM says %x", k.what, n, k.key.Name)
		}
	}
	ak, _ := attest.ParsePublic("AK", id.AK.Public)
	if err := attest.CheckAK(ak); err != nil {
		t.Errorf("AK refused by the verifier: %v", err)
	}
	if p := ak.Pub.ObjectAttributes; !p.FixedParent || !p.SensitiveDataOrigin || !p.UserWithAuth {
		t.Errorf("AK attributes %+v", p)
	}
}

func TestEnsureRefusesForeignObjects(t *testing.T) {
	t.Parallel()
	_, tpm := tpmtest.NewHost(t)
	ctx := context.Background()
	if _, err := identity.Provision(ctx, tpm, identity.ProvisionOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		run  func() error
		want error
	}{
		{"MK at the AK handle", func() error {
			_, err := identity.EnsureMK(ctx, tpm, identity.Handles{MK: identity.DefaultAKHandle}, nil)
			return err
		}, identity.ErrHandleInUse},
		{"AK at the MK handle", func() error {
			_, err := identity.EnsureAK(ctx, tpm, identity.Handles{AK: identity.DefaultMKHandle})
			return err
		}, identity.ErrHandleInUse},
		{"MK with another policy", func() error {
			_, err := identity.EnsureMK(ctx, tpm, identity.Handles{}, bytes.Repeat([]byte{1}, 32))
			return err
		}, identity.ErrHandleInUse},
		{"identity with the SRK as AK", func() error {
			_, err := identity.LoadIdentity(ctx, tpm, identity.LoadOptions{Handles: identity.Handles{AK: vtpm.DefaultSRKHandle}})
			return err
		}, identity.ErrHandleInUse},
		{"AK without an SRK", func() error {
			_, err := identity.EnsureAK(ctx, tpm, identity.Handles{SRK: 0x81000abc, AK: 0x81000abd})
			return err
		}, identity.ErrNotProvisioned},
		{"no MK", func() error {
			_, err := identity.LoadIdentity(ctx, tpm, identity.LoadOptions{Handles: identity.Handles{MK: 0x81000abe}})
			return err
		}, identity.ErrNotProvisioned},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run()
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			t.Logf("refusal: %v", err)
		})
	}
}

func TestReadEK(t *testing.T) {
	t.Parallel()
	h, tpm := tpmtest.NewHost(t)
	ctx := context.Background()
	roots := attest.NewRootStore()
	for _, p := range []string{h.RootCAPath(), h.IntermediateCAPath()} {
		cs, err := attest.ParseCertificates(readFile(t, p))
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range cs {
			roots.Add(c, p)
		}
	}
	for _, tc := range []struct {
		kind    identity.EKKind
		want    identity.EKKind
		handle  tpm2.TPMHandle
		nv      tpm2.TPMHandle
		nameAlg tpm2.TPMAlgID
	}{
		{identity.EKAuto, identity.EKRSA, 0x81010001, 0x01c00002, tpm2.TPMAlgSHA256},
		{identity.EKRSA, identity.EKRSA, 0x81010001, 0x01c00002, tpm2.TPMAlgSHA256},
		{identity.EKECC, identity.EKECC, 0x81010016, 0x01c00016, tpm2.TPMAlgSHA384}, // swtpm's P-384 EK
	} {
		t.Run(tc.kind.String(), func(t *testing.T) {
			ek, err := identity.ReadEK(ctx, tpm, tc.kind)
			if err != nil {
				t.Fatal(err)
			}
			if ek.Kind != tc.want || ek.Handle != tc.handle || ek.CertNV != tc.nv {
				t.Fatalf("EK %v at %#x cert %#x", ek.Kind, ek.Handle, ek.CertNV)
			}
			pub, err := attest.ParsePublic("EK", ek.Public)
			if err != nil {
				t.Fatal(err)
			}
			if pub.Pub.NameAlg != tc.nameAlg {
				t.Errorf("nameAlg %v, want %v", pub.Pub.NameAlg, tc.nameAlg)
			}
			cert, err := attest.ParseCertificate(ek.Cert)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := roots.VerifyEK(cert, nil, attest.CertPolicy{}, time.Now()); err != nil {
				t.Errorf("EK certificate does not chain to the host CA: %v", err)
			}
		})
	}
	if _, err := identity.ParseEKKind("dsa"); !errors.Is(err, identity.ErrBadOptions) {
		t.Errorf("ParseEKKind(dsa) = %v", err)
	}
}
