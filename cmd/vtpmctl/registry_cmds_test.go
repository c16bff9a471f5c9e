package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// TestFleetCommands drives the operator's commands against the in-process
// fleet with its embedded registry (three members, the hosts enrolled
// once each): members, host list (text and JSON), vm create and vm list
// --fleet, drain (a migration towards a draining host is refused by the
// registry, exit 2) and undrain, fence, a repeated enrolment (a no-op), a
// snapshot.
func TestFleetCommands(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	f, err := inproc.New(ctx, inproc.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close(context.Background()) })
	sock := f.InProcHost(fleet.HostA).Config().AdminSocketPath()
	op := []string{"--socket", sock, "--pki", f.PKIDir()}
	ctl := ctlWant(t)

	out := ctl(0, append([]string{"registry", "members"}, op...)...)
	for _, h := range f.HostNames() {
		if !strings.Contains(out, h) {
			t.Errorf("registry members lacks %s:\n%s", h, out)
		}
	}
	out = ctl(0, "host", "list", "--socket", sock)
	if !strings.Contains(out, "STATE") || strings.Count(out, "active") != 3 || strings.Count(out, "activation by root") != 3 {
		t.Errorf("host list:\n%s", out)
	}
	var hosts []adminapi.HostInfo
	if err := json.Unmarshal([]byte(ctl(0, "host", "list", "--json", "--socket", sock)), &hosts); err != nil || len(hosts) != 3 {
		t.Fatalf("host list --json: %+v %v", hosts, err)
	}
	for _, h := range hosts {
		if !h.Enrolled || !h.Registered || !h.Live || h.State != "active" {
			t.Errorf("host %+v", h)
		}
	}

	out = ctl(0, "vm", "create", "web-9", "--socket", sock)
	if !strings.Contains(out, "generation 1") {
		t.Errorf("vm create: %s", out)
	}
	out = ctl(0, "vm", "list", "--fleet", "--socket", sock)
	if !strings.Contains(out, "web-9") || !strings.Contains(out, "host-a") {
		t.Errorf("vm list --fleet:\n%s", out)
	}
	var fl adminapi.FleetVMs
	if err := json.Unmarshal([]byte(ctl(0, "vm", "list", "--fleet", "--json", "--socket", sock)), &fl); err != nil || len(fl.VMs) != 1 ||
		fl.VMs[0].Owner != fleet.HostA || fl.VMs[0].Generation != 1 || !fl.VMs[0].OwnerLive {
		t.Fatalf("vm list --fleet --json: %+v %v", fl, err)
	}

	ctl(0, append([]string{"host", "drain", fleet.HostB}, op...)...)
	out = ctl(2, "migrate", "web-9", "--to", fleet.HostB, "--socket", sock)
	if !strings.Contains(out, "rule host-active") {
		t.Errorf("migration towards a draining host:\n%s", out)
	}
	ctl(0, append([]string{"host", "undrain", fleet.HostB}, op...)...)
	ctl(0, append([]string{"host", "fence", fleet.HostC}, op...)...)
	if out = ctl(0, "host", "list", "--socket", sock); !strings.Contains(out, "fenced") {
		t.Errorf("host list after fence:\n%s", out)
	}
	out = ctl(0, append([]string{"host", "enroll", fleet.HostB}, op...)...)
	if !strings.Contains(out, "enrolled in the fleet registry") {
		t.Errorf("enrolling again: %s", out)
	}
	snap := filepath.Join(t.TempDir(), "registry.snap")
	ctl(0, append([]string{"registry", "snapshot", snap}, op...)...)
	if st, err := os.Stat(snap); err != nil || st.Size() == 0 || st.Mode().Perm() != 0o600 {
		t.Fatalf("snapshot: %v %v", st, err)
	}
	// A host's certificate is not the operator's: no snapshot, no drain.
	hostOp := []string{"--socket", sock, "--pki", f.PKIDir(), "--user", fleet.HostA}
	if code, _, errOut := runCtl(t, append([]string{"host", "drain", fleet.HostB}, hostOp...)...); code == 0 || !strings.Contains(errOut, "permission") {
		t.Errorf("drain with a host's certificate: exit %d %s", code, errOut)
	}
}
