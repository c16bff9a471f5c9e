package devfleet_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/internal/agent"
	"github.com/vtpmm/vtpmm/internal/devfleet"
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

func adminClient(socket string) *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}}
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
	body, _ := json.Marshal(agent.MigrateRequest{VMs: []string{"web-1"}, To: "host-b"})
	resp, err := adminClient(a.Cfg.AdminSocketPath()).Post("http://vtpmd/v1/migrate", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	var phases []string
	var end agent.MigrateEvent
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		var ev agent.MigrateEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatal(err)
		}
		if ev.Done {
			end = ev
		} else {
			phases = append(phases, ev.Phase)
		}
	}
	resp.Body.Close()
	if end.Code != "ok" || len(end.Result.Committed) != 1 || end.Result.Committed[0] != vm {
		t.Fatalf("migration: %+v", end)
	}
	if strings.Join(phases, ",") != "attest,wrap,prepare,hypervisor,commit" {
		t.Fatalf("phases %v", phases)
	}
	// Ownership moved: B lists the VM as owned at generation 2, A does not.
	for _, c := range []struct {
		h     *devfleet.Host
		owned bool
	}{{a, false}, {b, true}} {
		var vms []agent.VMInfo
		r, err := adminClient(c.h.Cfg.AdminSocketPath()).Get("http://vtpmd/v1/vms")
		if err != nil {
			t.Fatal(err)
		}
		_ = json.NewDecoder(r.Body).Decode(&vms)
		r.Body.Close()
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
	// Graceful shutdown: Serve returns nil, the admin socket goes away with the listener.
	for _, h := range []*devfleet.Host{a, b} {
		if err := h.StopDaemon(); err != nil {
			t.Fatalf("%s: shutdown: %v", h.Name, err)
		}
		if _, err := adminClient(h.Cfg.AdminSocketPath()).Get("http://vtpmd/v1/vms"); err == nil {
			t.Fatalf("%s: admin API still answers after shutdown", h.Name)
		}
	}
}

func httpGet(t *testing.T, d *agent.Daemon, path string) string {
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
