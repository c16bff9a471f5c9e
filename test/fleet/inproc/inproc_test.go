package inproc_test

import (
	"context"
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
	"github.com/vtpmm/vtpmm/test/fleet/scenarios"
)

func newFleet(t *testing.T, hookMode bool) *inproc.Fleet {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	f, err := inproc.New(ctx, inproc.Config{HookMode: hookMode})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := f.Close(ctx); err != nil {
			t.Errorf("close fleet: %v", err)
		}
	})
	return f
}

// TestScenarios runs the migration scenarios (test/fleet) on the
// in-process fleet; test/e2e runs the same on the libvirt lab.
func TestScenarios(t *testing.T) {
	t.Parallel()
	scenarios.Run(t, newFleet(t, false))
}

// TestScenariosHookMode runs them with the hooks installed on every fake
// hypervisor host, hook mode included.
func TestScenariosHookMode(t *testing.T) {
	t.Parallel()
	scenarios.Run(t, newFleet(t, true))
}

// TestMetricsAndShutdown: a migration through the admin API shows in both
// daemons' metrics (the phases, the TPM commands: one Import on the
// destination), and Close makes the admin API go away.
func TestMetricsAndShutdown(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t, false)
	vm, err := f.CreateVM(ctx, fleet.HostA, "web-1")
	if err != nil {
		t.Fatal(err)
	}
	a, b := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB)
	var phases []string
	end, err := a.Admin().Migrate(ctx, adminapi.MigrateRequest{VMs: []string{"web-1"}, To: fleet.HostB},
		func(ev adminapi.MigrateEvent) { phases = append(phases, ev.Phase) })
	if err != nil || len(end.Result.Committed) != 1 || end.Result.Committed[0] != vm.UUID {
		t.Fatalf("migration: %+v %v", end, err)
	}
	if strings.Join(phases, ",") != "attest,wrap,prepare,hypervisor,commit" {
		t.Fatalf("phases %v", phases)
	}
	metrics := func(h *inproc.Host) string {
		rec := httptest.NewRecorder()
		h.Daemon().MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		b, _ := io.ReadAll(rec.Body)
		return string(b)
	}
	for _, want := range []string{`vtpmm_migrations_total{result="committed"} 1`, `vtpmm_migration_phase_seconds_count{phase="attest"} 1`, `vtpmm_tpm_commands_total{command="ReadPublic"}`} {
		if !strings.Contains(metrics(a), want) {
			t.Errorf("source metrics lack %s", want)
		}
	}
	if !strings.Contains(metrics(b), `vtpmm_tpm_commands_total{command="Import"} 1`) {
		t.Errorf("destination metrics lack its single Import")
	}
	for _, h := range []*inproc.Host{a, b} {
		if err := h.Daemon().Close(ctx); err != nil {
			t.Fatalf("%s: close: %v", h.Name(), err)
		}
		if _, err := h.Admin().VMs(ctx); err == nil {
			t.Fatalf("%s: admin API still answers after Close", h.Name())
		}
	}
}
