package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
)

// failoverStub serves /v1/standby and /v1/failover as vtpmd does: a
// failover from host-b succeeds, any other is refused (rule owner-live),
// or fails without quorum for VM "noquorum".
func failoverStub(t *testing.T) string {
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
	mux.HandleFunc("POST "+adminapi.PathStandby, func(w http.ResponseWriter, r *http.Request) {
		var req adminapi.StandbyRequest
		_ = json.NewDecoder(r.Body).Decode(&req)
		set := adminapi.StandbySet{VM: req.VM, Owner: "host-a", Generation: 3}
		for _, h := range req.On {
			set.Standbys = append(set.Standbys, adminapi.StandbyInfo{Host: h, Generation: 3, Current: true, Age: 4 * time.Second})
		}
		adminapi.WriteJSON(w, http.StatusOK, set)
	})
	mux.HandleFunc("POST "+adminapi.PathFailover, func(w http.ResponseWriter, r *http.Request) {
		var req adminapi.FailoverRequest
		_ = json.NewDecoder(r.Body).Decode(&req)
		switch {
		case req.VM == "noquorum":
			adminapi.WriteError(w, http.StatusForbidden, fmt.Errorf("promote: %w: %w", migrate.ErrRegistryUnavailable, registry.ErrNoQuorum))
		case req.To == "host-b" && len(req.ConfirmFenced) == 1:
			adminapi.WriteJSON(w, http.StatusOK, adminapi.FailoverReport{VM: req.VM, Host: "host-b", From: "host-a", Generation: 4,
				Fenced: req.ConfirmFenced, Promote: 120 * time.Millisecond, Start: 50 * time.Millisecond, Started: !req.NoStart})
		default:
			adminapi.WriteError(w, http.StatusForbidden, fmt.Errorf("promote: %w: host-a's liveness lease is alive (rule %s)", migrate.ErrFailoverRefused, migrate.RuleOwnerLive))
		}
	})
	srv := &http.Server{Handler: mux}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Close() })
	return sock
}

func TestFailoverCommands(t *testing.T) {
	sock := failoverStub(t)
	tests := []struct {
		name     string
		args     []string
		wantCode int
		wantOut  string
	}{
		{"standby on", []string{"vm", "standby", "web-1", "--on", "host-b,host-c"}, 0, "host-c   3           true     4s"},
		{"failover confirmed", []string{"failover", "web-1", "--to", "host-b", "--confirm-fenced", "host-a"}, 0, "host-b took it over from host-a at generation 4 (fenced host-a)"},
		{"failover no start", []string{"failover", "web-1", "--to", "host-b", "--confirm-fenced", "host-a", "--no-start"}, 0, "not started (--no-start)"},
		{"failover refused", []string{"failover", "web-1", "--to", "host-b"}, 2, ""},
		{"failover without quorum", []string{"failover", "noquorum", "--to", "host-b", "--confirm-fenced", "host-a"}, 6, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			err := Run(context.Background(), append(tc.args, "--socket", sock), &out, &errb)
			if got := exitCode(err); got != tc.wantCode {
				t.Fatalf("exit %d, want %d (err %v, stderr %s)", got, tc.wantCode, err, errb.String())
			}
			if !strings.Contains(out.String(), tc.wantOut) {
				t.Fatalf("stdout %q lacks %q", out.String(), tc.wantOut)
			}
		})
	}
	var out, errb bytes.Buffer
	if err := Run(context.Background(), []string{"failover", "web-1", "--socket", sock}, &out, &errb); err == nil || !strings.Contains(err.Error(), "--to") {
		t.Fatalf("failover without --to: %v", err)
	}
}
