package devfleet_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/devfleet"
	"github.com/vtpmm/vtpmm/internal/errclass"
)

const goodLog = "../../vtpm/emuhost/testdata/gce-cos-85.eventlog.bin"

func newFleet(t *testing.T, hosts ...string) *devfleet.Fleet {
	t.Helper()
	ctx := context.Background()
	root, err := os.MkdirTemp("/tmp", "devfleet-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	cfg, err := devfleet.Provision(root, hosts, goodLog)
	if err != nil {
		t.Fatal(err)
	}
	f := devfleet.New(cfg)
	t.Cleanup(func() { _ = f.Close(context.Background()) })
	for _, h := range hosts {
		if _, err := f.AddHost(ctx, h, goodLog); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := f.EnrollAll(ctx); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestDaemonsMigrateOverTheWire runs two real daemons: the migration goes
// through the admin API (as vtpmctl does), the agent wire (gRPC over
// mTLS), the fake hypervisor; metrics and the audit log record it; both
// daemons shut down gracefully.
func TestDaemonsMigrateOverTheWire(t *testing.T) {
	ctx := context.Background()
	f := newFleet(t, "host-a", "host-b")
	a, b := f.Hosts["host-a"], f.Hosts["host-b"]
	vm, err := a.CreateRunningVM(ctx, "web-1")
	if err != nil {
		t.Fatal(err)
	}
	var phases []string
	end, err := adminapi.NewClient(a.Cfg.AdminSocketPath()).Migrate(ctx, adminapi.MigrateRequest{VMs: []string{"web-1"}, To: "host-b"},
		func(ev adminapi.MigrateEvent) { phases = append(phases, ev.Phase) })
	if err != nil || end.Code != errclass.CodeOK || len(end.Result.Committed) != 1 || end.Result.Committed[0] != vm {
		t.Fatalf("migration: %+v %v", end, err)
	}
	if strings.Join(phases, ",") != "attest,wrap,prepare,hypervisor,commit" {
		t.Fatalf("phases %v", phases)
	}
	// Ownership moved: B lists the VM as owned at generation 2, A does not.
	for _, c := range []struct {
		h     *devfleet.Host
		owned bool
	}{{a, false}, {b, true}} {
		vms, err := adminapi.NewClient(c.h.Cfg.AdminSocketPath()).VMs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		owned := false
		for _, v := range vms {
			if v.UUID == vm && v.Owned {
				owned = v.Generation == 2
			}
		}
		if owned != c.owned {
			t.Fatalf("%s: owned=%v, want %v (%+v)", c.h.Name, owned, c.owned, vms)
		}
	}
	// Metrics: the committed migration, its phases and the TPM commands.
	rec := httpGet(t, a.Daemon, "/metrics")
	for _, want := range []string{`vtpmm_migrations_total{result="committed"} 1`, `vtpmm_migration_phase_seconds_count{phase="attest"} 1`, `vtpmm_tpm_commands_total{command="ReadPublic"}`} {
		if !strings.Contains(rec, want) {
			t.Errorf("source metrics lack %s", want)
		}
	}
	if rec := httpGet(t, b.Daemon, "/metrics"); !strings.Contains(rec, `vtpmm_tpm_commands_total{command="Import"} 1`) {
		t.Errorf("destination metrics lack its single Import")
	}
	// Graceful shutdown: Close returns nil, the admin socket goes away with the listener.
	for _, h := range []*devfleet.Host{a, b} {
		if err := h.StopDaemon(); err != nil {
			t.Fatalf("%s: shutdown: %v", h.Name, err)
		}
		if _, err := adminapi.NewClient(h.Cfg.AdminSocketPath()).VMs(ctx); err == nil {
			t.Fatalf("%s: admin API still answers after shutdown", h.Name)
		}
	}
}

func httpGet(t *testing.T, d *daemon.Daemon, path string) string {
	t.Helper()
	srv := d.MetricsHandler()
	rr := &recorder{header: http.Header{}}
	req, _ := http.NewRequest(http.MethodGet, path, nil)
	srv.ServeHTTP(rr, req)
	b, _ := io.ReadAll(&rr.body)
	return string(b)
}

type recorder struct {
	header http.Header
	body   bytes.Buffer
	code   int
}

func (r *recorder) Header() http.Header         { return r.header }
func (r *recorder) Write(b []byte) (int, error) { return r.body.Write(b) }
func (r *recorder) WriteHeader(c int)           { r.code = c }
