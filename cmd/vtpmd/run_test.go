package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/internal/fixtures"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// TestRunCommands drives vtpmd through Run against a real emulated host
// TPM, in the order an operator would.
func TestRunCommands(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := tpmtest.StartHost(t)
	if err := h.Boot(ctx, fixtures.GoodBootLog()); err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("/tmp", "vtpmd-cli-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	goodLog, _, err := fixtures.BootLogs(dir)
	if err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "vtpmd.yaml")
	conf := "host_id: host-a\ndata_dir: " + dir + "/data\nrun_dir: " + dir + "/run\ntpm: " + h.URI() + "\n"
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	predict := filepath.Join(dir, "predict.json")
	_ = os.WriteFile(predict, []byte(`{"sha256": {"7": "zz"}}`), 0o600)
	nonce := strings.Repeat("ab", 32)
	evFile := filepath.Join(dir, "evidence.json")

	tests := []struct {
		name    string
		args    []string
		wantOut string // substring of stdout
		wantErr string // substring of the error; "" means success
	}{
		{"vault before init", []string{"vault", "status"}, "", "run 'vtpmd init'"},
		{"init", []string{"init"}, "initialised: vault key", ""},
		{"init twice", []string{"init"}, "", "already initialized"},
		{"vault status", []string{"vault", "status"}, "unseal cost: 7 TPM commands", ""},
		{"vm create", []string{"vm", "create", "web-1", "--uuid", "0e2e0e2e-0000-4000-8000-0000000000c1"}, "created vTPM for VM web-1", ""},
		{"vm create bad name", []string{"vm", "create", "web 1"}, "", "name \"web 1\""},
		{"vm list", []string{"vm", "list"}, "web-1", ""},
		{"reseal bad predict", []string{"vault", "reseal", "--predict", predict}, "", "is not a PCR index with a SHA-256 value"},
		{"reseal", []string{"vault", "reseal"}, "vault resealed to: boot state at reseal", ""},
		{"evidence provision", []string{"evidence", "provision"}, "", ""},
		{"evidence bad nonce", []string{"evidence", "--nonce", "xyz"}, "", "--nonce must be"},
		{"evidence", []string{"evidence", "--nonce", nonce, "-o", evFile, "--event-log", goodLog}, "", ""},
		{"bad tpm profile", []string{"--tpm-profile", "slow", "vault", "status"}, "", "tpm_profile"},
	}
	for _, tc := range tests {
		var out, errb bytes.Buffer
		err := Run(ctx, append([]string{"--config", cfg}, tc.args...), strings.NewReader(""), &out, &errb, Deps{})
		switch {
		case tc.wantErr == "" && err != nil:
			t.Fatalf("%s: %v\nstderr: %s", tc.name, err, errb.String())
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Fatalf("%s: got error %v, want one containing %q", tc.name, err, tc.wantErr)
		case !strings.Contains(out.String(), tc.wantOut):
			t.Fatalf("%s: stdout %q lacks %q", tc.name, out.String(), tc.wantOut)
		}
		// Logs are JSON, one object per line.
		for _, l := range strings.Split(strings.TrimSpace(errb.String()), "\n") {
			if strings.HasPrefix(l, "{") && !json.Valid([]byte(l)) {
				t.Fatalf("%s: log line is not JSON: %s", tc.name, l)
			}
		}
	}
	b, err := os.ReadFile(evFile)
	if err != nil {
		t.Fatal(err)
	}
	ev, err := attest.DecodeEvidence(b)
	if err != nil {
		t.Fatalf("vtpmd evidence wrote undecodable evidence: %v", err)
	}
	if ev.HostID != "host-a" || len(ev.EventLog) == 0 {
		t.Fatalf("evidence: host %q, event log %d bytes", ev.HostID, len(ev.EventLog))
	}
}
