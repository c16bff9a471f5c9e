package adminapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/vtpmm/vtpmm/internal/errclass"
)

var errRefused = errclass.New(errclass.Refused, "destination refused by attestation policy")

// serve runs mux on a unix socket and returns a Client for it.
func serve(t *testing.T, mux *http.ServeMux) *Client {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "adminapi-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "vtpmd.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Close() })
	return NewClient(sock)
}

func TestClientErrors(t *testing.T) {
	mux := http.NewServeMux()
	refusal := fmt.Errorf("request pull: host-c: rule pcr-policy: %w", errRefused)
	mux.HandleFunc("POST "+PathHookPull, func(w http.ResponseWriter, r *http.Request) {
		WriteError(w, http.StatusForbidden, refusal)
	})
	mux.HandleFunc("POST "+PathMigrate, func(w http.ResponseWriter, r *http.Request) {
		enc := json.NewEncoder(w)
		_ = enc.Encode(MigrateEvent{Phase: "attest", Detail: "host-c"})
		end := MigrateEvent{Done: true, Error: refusal.Error(), Code: errclass.CodeOf(refusal), Reasons: errclass.Reasons(refusal)}
		_ = enc.Encode(end)
	})
	mux.HandleFunc("GET "+PathVMs, func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte(`[{"name": "web-1"}`)) // cut short
	})
	c := serve(t, mux)
	ctx := context.Background()

	_, err := c.HookPull(ctx, HookRequest{UUID: "6f1c3a52-0c41-4d1c-9d55-3f1e7c2b9a10"})
	if !errors.Is(err, errRefused) || errclass.ExitCode(err) != 2 || err.Error() != "vtpmd: "+refusal.Error() {
		t.Fatalf("hook pull refusal: %v (exit %d)", err, errclass.ExitCode(err))
	}
	var phases []string
	end, err := c.Migrate(ctx, MigrateRequest{VMs: []string{"web-1"}, To: "host-c"}, func(e MigrateEvent) { phases = append(phases, e.Phase) })
	if !errors.Is(err, errRefused) || end.Code != errclass.CodeRefused || len(phases) != 1 {
		t.Fatalf("migrate: %v, end %+v, phases %v", err, end, phases)
	}
	if _, err := c.VMs(ctx); !errors.Is(err, ErrProtocol) {
		t.Fatalf("cut answer: %v", err)
	}
	if _, err := NewClient("/nonexistent/vtpmd.sock").VMs(ctx); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("no daemon: %v", err)
	}
}
