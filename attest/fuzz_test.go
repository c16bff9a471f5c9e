package attest

import (
	"os"
	"path/filepath"
	"testing"
)

func addFiles(f *testing.F, glob string) {
	f.Helper()
	files, _ := filepath.Glob(filepath.Join(rw, glob))
	for _, p := range files {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
}

func FuzzDecodeEvidence(f *testing.F) {
	h := newFakeHost(f)
	good, _ := h.evidence(f, testNonce(1)).Encode()
	f.Add(good)
	f.Add([]byte(`{"format":"vtpmm-evidence","version":1}`))
	f.Add([]byte(`{"format":"vtpmm-evidence","version":7,"host_id":"x"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		ev, err := DecodeEvidence(data)
		if err != nil {
			return
		}
		// Whatever decodes must be safe to verify.
		v := h.verifier(t)
		_, _ = v.Verify(t.Context(), ev, ev.Nonce)
	})
}

func FuzzParseCertificates(f *testing.F) {
	addFiles(f, "ekcerts/*/*")
	addFiles(f, "roots/STM_RSA_02I.pem")
	f.Fuzz(func(t *testing.T, data []byte) {
		certs, err := ParseCertificates(data)
		if err != nil {
			return
		}
		store := NewRootStore(certs...)
		for _, c := range certs {
			_ = c.Label()
			_, _ = store.VerifyEK(c, certs, CertPolicy{CheckValidity: true}, pinnedNow)
		}
	})
}

func FuzzParseEventLog(f *testing.F) {
	addFiles(f, "eventlogs/*.bin")
	addFiles(f, "eventlogs/*_eventlog")
	f.Fuzz(func(t *testing.T, data []byte) {
		l, err := ParseEventLog(data)
		if err != nil {
			return
		}
		_ = l.Replay()
		_, _ = l.Facts()
		for i := range l.Events {
			_ = l.Events[i].Describe()
		}
	})
}

func FuzzTPMStructures(f *testing.F) {
	addFiles(f, "attestations/extracted/*.bin")
	f.Fuzz(func(t *testing.T, data []byte) {
		if p, err := ParsePublic("x", data); err == nil {
			_, _ = p.Name()
			_, _ = p.CryptoKey()
			_ = CheckAK(p)
		}
		_, _ = ParseAttest(data, tpmSTAttestQuote)
		_, _ = VerifyTPMSignature(nil, data, data)
	})
}
