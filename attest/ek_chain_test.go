package attest

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

var rw = filepath.Join("testdata", "realworld")

// pinnedNow is the verification time for real-world data (SOURCES.md: verdicts are relative to 2026-11).
var pinnedNow = time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)

func mustCerts(t testing.TB, path string) []*Cert {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := ParseCertificates(data)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return certs
}

func mustStore(t testing.TB, dirs ...string) *RootStore {
	t.Helper()
	s, err := LoadRootStore(dirs...)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestLoadRootStoreRealWorld(t *testing.T) {
	s := mustStore(t, filepath.Join(rw, "roots"))
	// 52 files, IFX1..8 duplicate IFX_RSA_0nI (deduplicated), 2 files with text before the PEM block.
	if s.Len() < 40 {
		t.Fatalf("loaded %d anchors, want >= 40", s.Len())
	}
	for _, c := range s.certs {
		if c.PublicKey == nil {
			t.Errorf("%s: no public key parsed", c.Label())
		}
	}
}

func TestVerifyEKRealWorld(t *testing.T) {
	roots := filepath.Join(rw, "roots")
	gce := filepath.Join(rw, "ekcerts", "gce")
	gceStore := &RootStore{}
	for _, f := range []string{"gcp_ek_ak_ca_root.crt", "tpm_ek_root_1.cer"} {
		for _, c := range mustCerts(t, filepath.Join(gce, f)) {
			gceStore.Add(c, f)
		}
	}
	gceInter := append(mustCerts(t, filepath.Join(gce, "gcp_ek_ak_ca_intermediate_v3.crt")),
		append(mustCerts(t, filepath.Join(gce, "tpm_ek_intermediate_3.crt")), mustCerts(t, filepath.Join(gce, "tpm_ek_intermediate_2.crt"))...)...)
	stmOrigInter := mustCerts(t, filepath.Join(rw, "ekcerts", "stm", "stmtpmekint02.pem"))
	stmRootOnly := NewRootStore(mustCerts(t, filepath.Join(rw, "ekcerts", "stm", "gstpmroot.pem"))...)
	stmRT := mustCerts(t, filepath.Join(rw, "ekcerts", "stm", "STM_RSA_RT.pem"))
	ifxRoot := NewRootStore(mustCerts(t, filepath.Join(rw, "ekcerts", "ifx-tpm12", "IFX-RootCA.crt"))...)
	ifxInter := append(mustCerts(t, filepath.Join(rw, "ekcerts", "ifx-tpm12", "IFX_RSA_08I.pem")), mustCerts(t, filepath.Join(rw, "ekcerts", "ifx-tpm12", "IFX_RSA_RT.pem"))...)

	tests := []struct {
		name    string
		leaf    string
		store   *RootStore
		inter   []*Cert
		pol     CertPolicy
		wantLen int
		wantErr error
	}{
		{"stm leaf (sha1) accepted by default", "ekcerts/stm/ab21ccf2-tpmcert.pem", mustStore(t, roots), nil, CertPolicy{}, 2, nil},
		{"stm leaf sha1 refused when strict", "ekcerts/stm/ab21ccf2-tpmcert.pem", mustStore(t, roots), nil, CertPolicy{Strict: true}, 0, ErrEKSignature},
		{"stm leaf expired when validity checked", "ekcerts/stm/ab21ccf2-tpmcert.pem", mustStore(t, roots), nil, CertPolicy{CheckValidity: true}, 0, ErrEKExpired},
		{"stm leaf via non-DER original intermediate", "ekcerts/stm/ab21ccf2-tpmcert.pem", stmRootOnly, append(stmOrigInter, stmRT...), CertPolicy{}, 4, nil},
		{"ifx NV-header leaf under keylime roots", "ekcerts/ifx-tpm12/ek_cert_with_security_assertions.cer", mustStore(t, roots), nil, CertPolicy{}, 2, nil},
		{"ifx leaf to verisign root", "ekcerts/ifx-tpm12/ek_cert_with_security_assertions.cer", ifxRoot, ifxInter, CertPolicy{}, 4, nil},
		{"ifx leaf untrusted without intermediates", "ekcerts/ifx-tpm12/ek_cert_with_security_assertions.cer", ifxRoot, nil, CertPolicy{}, 0, ErrEKUntrustedRoot},
		{"gce leaf under keylime roots is untrusted", "ekcerts/gce/uca_tpm_rsa_enc_cert.pem", mustStore(t, roots), nil, CertPolicy{}, 0, ErrEKUntrustedRoot},
		{"gce ak cert from attestation", "attestations/extracted/gce-cos-85.akcert.pem", gceStore, gceInter, CertPolicy{CheckValidity: true}, 3, nil},
	}
	for _, f := range []string{"pca_tpm_rsa_enc_cert.pem", "pca_tpm_rsa_sign_cert.pem", "pca_tpm_ecc_enc_cert.pem", "pca_tpm_ecc_sign_cert.pem",
		"uca_tpm_rsa_enc_cert.pem", "uca_tpm_rsa_sign_cert.pem", "uca_tpm_ecc_enc_cert.pem", "uca_tpm_ecc_sign_cert.pem"} {
		tests = append(tests, struct {
			name    string
			leaf    string
			store   *RootStore
			inter   []*Cert
			pol     CertPolicy
			wantLen int
			wantErr error
		}{"gce " + f, "ekcerts/gce/" + f, gceStore, gceInter, CertPolicy{CheckValidity: true}, 3, nil})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			leaf := mustCerts(t, filepath.Join(rw, tt.leaf))[0]
			chain, err := tt.store.VerifyEK(leaf, tt.inter, tt.pol, pinnedNow)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(chain) != tt.wantLen || !chain[len(chain)-1].Anchor {
				t.Fatalf("chain:\n%s want %d links ending at an anchor", chain, tt.wantLen)
			}
		})
	}
}

func TestLoadRootStoreSkipsLeaves(t *testing.T) {
	// ekcerts/gce holds 5 CA certificates (2 roots, 3 intermediates) and 8 EK/AK leaves.
	s := mustStore(t, filepath.Join(rw, "ekcerts", "gce"))
	if s.Len() != 5 {
		t.Fatalf("%d anchors, want the 5 CA certificates", s.Len())
	}
	leaf := mustCerts(t, filepath.Join(rw, "ekcerts", "gce", "uca_tpm_ecc_enc_cert.pem"))[0]
	chain, err := s.VerifyEK(leaf, nil, CertPolicy{}, pinnedNow)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 || chain[0].Anchor {
		t.Fatalf("chain:\n%s", chain)
	}
}

func TestVerifyEKTampered(t *testing.T) {
	store := mustStore(t, filepath.Join(rw, "roots"))
	orig := mustCerts(t, filepath.Join(rw, "ekcerts", "stm", "ab21ccf2-tpmcert.pem"))[0]
	pol := CertPolicy{}
	if _, err := store.VerifyEK(orig, nil, pol, pinnedNow); err != nil {
		t.Fatalf("untampered: %v", err)
	}
	sigOff := len(orig.Raw) - 10     // inside the signature BIT STRING
	tbsOff := len(orig.RawTBS)/2 + 4 // inside the TBS (public key area)
	for _, tc := range []struct {
		name string
		off  int
	}{{"signature byte", sigOff}, {"tbs byte", tbsOff}} {
		t.Run(tc.name, func(t *testing.T) {
			raw := append([]byte(nil), orig.Raw...)
			raw[tc.off] ^= 0x01
			c, err := ParseCertificate(raw)
			if err != nil {
				t.Fatal(err)
			}
			_, err = store.VerifyEK(c, nil, pol, pinnedNow)
			if !errors.Is(err, ErrEKSignature) {
				t.Fatalf("err = %v, want ErrEKSignature", err)
			}
		})
	}
}
