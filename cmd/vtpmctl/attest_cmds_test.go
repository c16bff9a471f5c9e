package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/internal/fixtures"
)

// fixtureDir writes the shared fixtures the attestation commands read
// (internal/fixtures) below a temporary directory.
func fixtureDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, name := range []string{"synthetic", "ekcerts", "roots", "eventlogs", "expected-pcrs.json"} {
		if _, err := fixtures.Write(dir, name); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestAttestCommands(t *testing.T) {
	td := fixtureDir(t)
	nonceHex, err := os.ReadFile(filepath.Join(td, "synthetic", "nonce.hex"))
	if err != nil {
		t.Fatal(err)
	}
	nonce := strings.TrimSpace(string(nonceHex))
	syn := func(f string) string { return filepath.Join(td, "synthetic", f) }
	real := func(f string) string { return filepath.Join(td, f) }
	at := "--at=2026-11-21T12:00:00Z"
	// A tampered copy of the evidence: another nonce than the one issued.
	evGood, err := os.ReadFile(syn("evidence.json"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.json")
	if err := os.WriteFile(garbage, evGood[:len(evGood)/3], 0o600); err != nil {
		t.Fatal(err)
	}
	verify := []string{"evidence", "verify", syn("evidence.json"), "--policy", syn("policy.yaml"), "--roots", syn("roots"), "--enrollments", syn("enrollments.json"), at}
	ak := func(f string) string { return filepath.Join(td, "synthetic", "akcert", f) }
	akv := []string{"evidence", "verify", ak("evidence.json"), "--policy", ak("policy.yaml"), "--roots", ak("roots"), "--enrollments", ak("enrollments.json"), "--nonce", nonce, at}

	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantOut    []string
		wantErrOut []string
	}{
		{"ek verify stm sha1 accepted by default", []string{"ek", "verify", real("ekcerts/ab21ccf2-tpmcert.pem"), "--roots", real("roots")}, 0,
			[]string{"STM TPM EK Intermediate CA 02", "trust anchor"}, []string{"warning: SHA-1 signature(s) accepted at depth [0]"}},
		{"ek verify stm sha1 refused with --strict", []string{"ek", "verify", real("ekcerts/ab21ccf2-tpmcert.pem"), "--roots", real("roots"), "--strict"}, 2,
			nil, []string{"rule ek-signature", "SHA-1", "ek.strict"}},
		{"ek verify deprecated --allow-sha1", []string{"ek", "verify", real("ekcerts/ab21ccf2-tpmcert.pem"), "--roots", real("roots"), "--allow-sha1"}, 0,
			[]string{"trust anchor"}, []string{"--allow-sha1 is deprecated", "--strict"}},
		{"ek verify ifx NV header", []string{"ek", "verify", real("ekcerts/ek_cert_with_security_assertions.cer"), "--roots", real("roots")}, 0,
			[]string{"IFX TPM EK Intermediate CA 08"}, nil},
		{"ek verify gce untrusted", []string{"ek", "verify", real("ekcerts/pca_tpm_rsa_enc_cert.pem"), "--roots", real("roots")}, 2,
			nil, []string{"rule ek-chain", "does not chain to a trusted root"}},
		{"ek verify missing roots flag", []string{"ek", "verify", real("ekcerts/pca_tpm_rsa_enc_cert.pem")}, 1, nil, []string{"roots"}},
		{"eventlog replay table with events", []string{"eventlog", "replay", real("eventlogs/debian-10.bin"), "--events"}, 0,
			[]string{"legacy SHA-1 event log, 25 events", "sha1  7", "EV_EFI_VARIABLE_DRIVER_CONFIG", "SecureBoot"}, nil},
		{"eventlog replay garbage", []string{"eventlog", "replay", garbage}, 1, nil, []string{"malformed event log"}},
		{"eventlog golden", []string{"eventlog", "golden", real("eventlogs/debian-10.bin"), "--bank", "sha1"}, 0,
			[]string{"require_secure_boot: true", "bank: sha1"}, nil},
		{"evidence verify explain", append(append([]string{}, verify...), "--nonce", nonce, "--explain"), 0,
			[]string{"PASS ek-chain", "PASS secure-boot", "host-b: attestation passed"}, nil},
		{"evidence verify without nonce warns", verify, 0, []string{"attestation passed"}, []string{"freshness is NOT checked"}},
		{"evidence verify other nonce", append(append([]string{}, verify...), "--nonce", strings.Repeat("ab", 32), "--explain"), 2,
			[]string{"FAIL nonce"}, []string{"host-b: rule nonce:"}},
		{"evidence verify not enrolled", []string{"evidence", "verify", syn("evidence.json"), "--policy", syn("policy.yaml"), "--roots", syn("roots"), "--nonce", nonce, at}, 2,
			nil, []string{"host-b: rule ak-activation: AK"}},
		{"evidence verify untrusted roots", []string{"evidence", "verify", syn("evidence.json"), "--policy", syn("policy.yaml"), "--roots", real("roots"), "--enrollments", syn("enrollments.json"), "--nonce", nonce, at}, 2,
			nil, []string{"host-b: rule ek-chain"}},
		{"evidence verify stale", []string{"evidence", "verify", syn("evidence.json"), "--policy", syn("policy.yaml"), "--roots", syn("roots"), "--enrollments", syn("enrollments.json"), "--nonce", nonce, "--at=2026-11-21T13:00:00Z"}, 2,
			nil, []string{"rule evidence-age"}},
		{"evidence verify garbage", []string{"evidence", "verify", garbage, "--policy", syn("policy.yaml"), at}, 1,
			nil, []string{"rule evidence-format"}},
		{"evidence verify AK certificate", append(append([]string{}, akv...), "--ak-roots", ak("akroots"), "--explain"), 0,
			[]string{"PASS ak-cert-chain", "PASS ak-cert-binding", "host-b: attestation passed"}, nil},
		{"evidence verify AK certificate without AK roots", akv, 2,
			nil, []string{"host-b: rule ak-cert-chain: no trust anchors configured"}},
		{"eventlog replay H-CRTM", []string{"eventlog", "replay", real("eventlogs/hcrtm-swtpm.bin")}, 0,
			[]string{"crypto-agile event log, 45 events", "PCR 0 replayed from locality 4 (H-CRTM", "sha256  0    05db9e5b8684a691"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			err := Run(context.Background(), tt.args, &out, &errOut)
			if code := exitCode(err); code != tt.wantCode {
				t.Fatalf("exit %d, want %d (err %v)\nstdout:\n%s\nstderr:\n%s", code, tt.wantCode, err, out.String(), errOut.String())
			}
			for _, w := range tt.wantOut {
				if !strings.Contains(out.String(), w) {
					t.Errorf("stdout lacks %q:\n%s", w, out.String())
				}
			}
			for _, w := range tt.wantErrOut {
				if !strings.Contains(errOut.String(), w) {
					t.Errorf("stderr lacks %q:\n%s", w, errOut.String())
				}
			}
		})
	}
}

// TestEventlogReplayJSONMatchesGroundTruth checks the -o json form against
// the quoted PCRs of the real GCE attestation.
func TestEventlogReplayJSONMatchesGroundTruth(t *testing.T) {
	var out, errOut bytes.Buffer
	td := fixtureDir(t)
	if err := Run(context.Background(), []string{"eventlog", "replay", filepath.Join(td, "eventlogs/gce-cos-85.eventlog.bin"), "-o", "json"}, &out, &errOut); err != nil {
		t.Fatalf("%v: %s", err, errOut.String())
	}
	var got map[string]map[string]string
	if err := json.Unmarshal(out.Bytes(), &got); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	data, err := os.ReadFile(filepath.Join(td, "expected-pcrs.json"))
	if err != nil {
		t.Fatal(err)
	}
	var truth struct {
		Entries []map[string]json.RawMessage `json:"entries"`
	}
	if err := json.Unmarshal(data, &truth); err != nil {
		t.Fatal(err)
	}
	for _, bank := range []string{"sha1", "sha256", "sha384"} {
		var want map[string]string
		if err := json.Unmarshal(truth.Entries[0][bank], &want); err != nil {
			t.Fatal(err)
		}
		if len(got[bank]) != 10 {
			t.Errorf("%s: %d PCRs, want 10 (PCR 0-9)", bank, len(got[bank]))
		}
		for pcr, w := range want {
			if got[bank][pcr] != w {
				t.Errorf("%s PCR %s: %s, want %s", bank, pcr, got[bank][pcr], w)
			}
		}
	}
}
