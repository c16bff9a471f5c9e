package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/errclass"
)

// adminStub serves /v1/migrate on a unix socket, streaming the given end
// event after two phases, the way vtpmd does.
func adminStub(t *testing.T, end adminapi.MigrateEvent) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "vtpmctl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "vtpmd.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+adminapi.PathMigrate, func(w http.ResponseWriter, r *http.Request) {
		var req adminapi.MigrateRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.To != "host-b" || req.VMs[0] != "web-1" {
			http.Error(w, `{"error":"bad request"}`, http.StatusBadRequest)
			return
		}
		enc := json.NewEncoder(w)
		_ = enc.Encode(adminapi.MigrateEvent{Phase: "attest", Detail: "host-b"})
		_ = enc.Encode(adminapi.MigrateEvent{Phase: "prepare", Detail: "host-b"})
		_ = enc.Encode(end)
	})
	srv := &http.Server{Handler: mux}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Close() })
	return sock
}

func TestMigrateExitCodes(t *testing.T) {
	ok := &adminapi.Result{TxID: "ab", Committed: []string{"0e2e0e2e-0000-4000-8000-000000000001"}}
	tests := []struct {
		name     string
		end      adminapi.MigrateEvent
		wantCode int
		wantOut  string
	}{
		{"migrated", adminapi.MigrateEvent{Done: true, Code: errclass.CodeOK, Result: ok}, 0, "1 VM(s) migrated"},
		{"refused", adminapi.MigrateEvent{Done: true, Code: errclass.CodeRefused, Error: "host-b: rule pcr-policy: PCR 0 differs"}, 2, "attest"},
		{"aborted", adminapi.MigrateEvent{Done: true, Code: errclass.CodeAborted, Error: "hypervisor migration failed"}, 3, "prepare"},
		{"unresolved", adminapi.MigrateEvent{Done: true, Code: errclass.CodeUnresolved, Error: "transaction not resolved yet"}, 4, ""},
		{"busy", adminapi.MigrateEvent{Done: true, Code: errclass.CodeBusy, Error: "VM is already being migrated"}, 5, ""},
		{"other", adminapi.MigrateEvent{Done: true, Code: errclass.CodeError, Error: "boom"}, 1, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sock := adminStub(t, tc.end)
			var out, errb bytes.Buffer
			err := Run(context.Background(), []string{"migrate", "web-1", "--to", "host-b", "--socket", sock}, &out, &errb)
			if got := exitCode(err); got != tc.wantCode {
				t.Fatalf("exit %d, want %d (err %v, stderr %s)", got, tc.wantCode, err, errb.String())
			}
			if !strings.Contains(out.String(), tc.wantOut) {
				t.Fatalf("stdout %q lacks %q", out.String(), tc.wantOut)
			}
			if tc.end.Error != "" && !strings.Contains(errb.String(), tc.end.Error) {
				t.Fatalf("stderr %q does not carry the reason %q", errb.String(), tc.end.Error)
			}
		})
	}
	// No daemon: a clear message naming the socket.
	var out, errb bytes.Buffer
	err := Run(context.Background(), []string{"migrate", "web-1", "--to", "host-b", "--socket", "/nonexistent/vtpmd.sock"}, &out, &errb)
	if err == nil || !strings.Contains(err.Error(), "cannot reach vtpmd at /nonexistent/vtpmd.sock") {
		t.Fatalf("without a daemon: %v", err)
	}
	// --to is required.
	if err := Run(context.Background(), []string{"migrate", "web-1"}, &out, &errb); err == nil || !strings.Contains(err.Error(), "--to") {
		t.Fatalf("missing --to: %v", err)
	}
}
