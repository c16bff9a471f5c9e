package metrics

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

func scrape(t *testing.T, h http.Handler) string {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("scrape: HTTP %d: %s", rec.Code, rec.Body)
	}
	return rec.Body.String()
}

func TestExposition(t *testing.T) {
	m := New()
	m.MigrationDone(ResultCommitted)
	m.MigrationDone(ResultCommitted)
	m.MigrationDone(ResultRefused)
	m.ObservePhase(PhaseAttest, 180*time.Millisecond)
	m.ObservePhase(PhaseWrap, 250*time.Millisecond)
	m.ObservePhase(PhaseHypervisor, 42*time.Second)
	m.AttestationRefused("pcr-7")
	m.AttestationRefused("pcr-7")
	m.AttestationRefused("ek-chain")
	m.SetVTPMs(12, 3)
	m.SetTPMCounter(func() map[string]int { return map[string]int{"Quote": 3, "Certify": 1} })
	out := scrape(t, m.Handler())

	tests := []struct{ name, want string }{
		{"committed", `vtpmm_migrations_total{result="committed"} 2`},
		{"refused", `vtpmm_migrations_total{result="refused"} 1`},
		{"failed starts at zero", `vtpmm_migrations_total{result="failed"} 0`},
		{"aborted starts at zero", `vtpmm_migrations_total{result="aborted"} 0`},
		{"counter type", `# TYPE vtpmm_migrations_total counter`},
		{"histogram type", `# TYPE vtpmm_migration_phase_seconds histogram`},
		{"attest bucket", `vtpmm_migration_phase_seconds_bucket{phase="attest",le="0.25"} 1`},
		{"attest below bucket", `vtpmm_migration_phase_seconds_bucket{phase="attest",le="0.1"} 0`},
		{"wrap sum", `vtpmm_migration_phase_seconds_sum{phase="wrap"} 0.25`},
		{"hypervisor count", `vtpmm_migration_phase_seconds_count{phase="hypervisor"} 1`},
		{"commit starts at zero", `vtpmm_migration_phase_seconds_count{phase="commit"} 0`},
		{"tpm quote", `vtpmm_tpm_commands_total{command="Quote"} 3`},
		{"tpm certify", `vtpmm_tpm_commands_total{command="Certify"} 1`},
		{"tpm counter type", `# TYPE vtpmm_tpm_commands_total counter`},
		{"refusals pcr", `vtpmm_attestation_refusals_total{rule="pcr-7"} 2`},
		{"refusals ek", `vtpmm_attestation_refusals_total{rule="ek-chain"} 1`},
		{"active", `vtpmm_vtpms{state="active"} 12`},
		{"pending", `vtpmm_vtpms{state="pending"} 3`},
		{"go collector", `go_goroutines `},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want := tt.want
			if strings.HasPrefix(want, "vtpmm_") {
				want += "\n" // the whole sample line
			}
			if !strings.Contains(out, want) {
				t.Errorf("exposition lacks %q", tt.want)
			}
		})
	}
	if t.Failed() {
		t.Log(out)
	}
}

// TestTPMCounterAtScrape checks that the TPM counts are read from the
// function at each scrape, not accumulated.
func TestTPMCounterAtScrape(t *testing.T) {
	m := New()
	var mu sync.Mutex
	counts := map[string]int{"Quote": 1}
	calls := 0
	m.SetTPMCounter(func() map[string]int {
		mu.Lock()
		defer mu.Unlock()
		calls++
		out := map[string]int{}
		for k, v := range counts {
			out[k] = v
		}
		return out
	})
	if out := scrape(t, m.Handler()); !strings.Contains(out, `vtpmm_tpm_commands_total{command="Quote"} 1`+"\n") {
		t.Fatalf("first scrape:\n%s", out)
	}
	mu.Lock()
	counts["Quote"] = 4
	counts["Load"] = 2
	mu.Unlock()
	out := scrape(t, m.Handler())
	for _, want := range []string{`vtpmm_tpm_commands_total{command="Quote"} 4`, `vtpmm_tpm_commands_total{command="Load"} 2`} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("second scrape lacks %q", want)
		}
	}
	if calls != 2 {
		t.Errorf("counter function called %d times for 2 scrapes", calls)
	}
	m.SetTPMCounter(nil)
	if out := scrape(t, m.Handler()); strings.Contains(out, "vtpmm_tpm_commands_total{") {
		t.Error("series remain after SetTPMCounter(nil)")
	}
}

// TestInstancesAreIndependent checks that nothing is registered globally.
func TestInstancesAreIndependent(t *testing.T) {
	a, b := New(), New()
	a.MigrationDone(ResultFailed)
	if out := scrape(t, b.Handler()); !strings.Contains(out, `vtpmm_migrations_total{result="failed"} 0`+"\n") {
		t.Error("a migration counted in a is visible in b")
	}
	if a.Registry() == b.Registry() {
		t.Error("shared registry")
	}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

func TestServeListener(t *testing.T) {
	m := New()
	m.MigrationDone(ResultAborted)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	base := "http://" + ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeListener(ctx, ln, m, nil) }()

	tests := []struct {
		path     string
		wantCode int
		wantBody string
	}{
		{"/metrics", 200, `vtpmm_migrations_total{result="aborted"} 1`},
		{"/healthz", 200, "ok"},
		{"/nope", 404, ""},
	}
	for _, tt := range tests {
		code, body := get(t, base+tt.path)
		if code != tt.wantCode || !strings.Contains(body, tt.wantBody) {
			t.Errorf("GET %s: %d %q", tt.path, code, body)
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ServeListener: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeListener did not return after cancel")
	}
	if _, err := http.Get(base + "/healthz"); err == nil {
		t.Error("server still answers after shutdown")
	}
}

func TestServe(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, "127.0.0.1:0", New(), nil) }()
	time.Sleep(50 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}

	// An address in use is a clear error.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := Serve(context.Background(), ln.Addr().String(), New(), nil); !errors.Is(err, ErrServe) || !strings.Contains(err.Error(), "listen") {
		t.Errorf("Serve on a busy port: %v", err)
	}
}
