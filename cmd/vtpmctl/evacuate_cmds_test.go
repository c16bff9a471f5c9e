package main

import (
	"bufio"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/migrate/evacuate"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// TestEvacuateCommand runs 'vtpmctl evacuate' against the in-process
// fleet (host-c tampered, host-d without room): the dry run prints the
// plan with host-c left out and its rule, host-d left out for room, moving
// nothing; the run marks host-a draining, moves both VMs to host-b and
// exits 0, its migrate progress lines carrying bytes, its last NDJSON line
// the report (with each VM's bytes); undrain makes host-a active again.
// Exit 1 for a host this vtpmd is not.
const hostD = "host-d"

func TestEvacuateCommand(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	f, err := inproc.New(ctx, inproc.Config{RegistryTTL: 10 * time.Second, Hosts: []inproc.HostSpec{
		{Name: fleet.HostA}, {Name: fleet.HostB}, {Name: fleet.HostC, Tampered: true}, {Name: hostD}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close(context.Background()) })
	// host-d is trusted but its hypervisor reports 256 MiB free: no room
	// for a VM of 1 GiB (plus the 512 MiB headroom). The plan asks each
	// destination's hypervisor (the fake's, as libvirt's
	// virNodeGetFreeMemory) and leaves host-d out, naming why.
	f.SetFreeMemory(hostD, 256<<20)
	// Each migration takes a moment after its state is across, so that
	// its progress shows the bytes the hypervisor reports.
	f.InProcHost(fleet.HostA).Fake().BeforeMigrateCommit = func() error {
		time.Sleep(time.Second)
		return nil
	}
	for _, name := range []string{"evac-1", "evac-2"} {
		if _, err := f.CreateVM(ctx, fleet.HostA, name); err != nil {
			t.Fatal(err)
		}
	}
	sock := f.InProcHost(fleet.HostA).Config().AdminSocketPath()
	op := []string{"--socket", sock, "--pki", f.PKIDir()}
	ctl := ctlWant(t, op...)

	out := ctl(0, "evacuate", fleet.HostA, "--dry-run")
	for _, want := range []string{"evac-1", "evac-2", fleet.HostB, fleet.HostC, "refused", "pcr-policy", hostD, "no-room"} {
		if !strings.Contains(out, want) {
			t.Errorf("dry run lacks %q:\n%s", want, out)
		}
	}
	if out := ctl(0, "host", "list"); strings.Contains(out, "draining") {
		t.Errorf("a dry run drained a host:\n%s", out)
	}

	out = ctl(0, "evacuate", fleet.HostA, "--json", "--parallel", "2")
	var last evacuate.Event
	withBytes := 0
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if !strings.HasPrefix(sc.Text(), "{") {
			continue
		}
		if err := json.Unmarshal(sc.Bytes(), &last); err != nil {
			t.Fatalf("NDJSON line %q: %v", sc.Text(), err)
		}
		if last.Type == evacuate.EventVMPhase && last.Phase == evacuate.PhaseMigrate && last.Bytes > 0 && last.Total >= last.Bytes {
			withBytes++
		}
	}
	if withBytes == 0 {
		t.Errorf("no migrate progress event carries bytes:\n%s", out)
	}
	if last.Type != evacuate.EventReport || last.Report.Counts[evacuate.OutcomeMoved] != 2 || last.Report.ExitCode != 0 {
		t.Fatalf("last event %+v:\n%s", last, out)
	}
	for _, v := range last.Report.VMs {
		if v.Host != fleet.HostB || v.Generation != 2 || v.Bytes < inproc.DefaultVMMemory {
			t.Errorf("report line %+v, want moved to host-b at generation 2, with its bytes", v)
		}
	}
	if out := ctl(0, "host", "list"); !strings.Contains(out, "draining") {
		t.Errorf("host-a not draining after its evacuation:\n%s", out)
	}
	ctl(0, "host", "undrain", fleet.HostA)
	if out := ctl(0, "host", "list"); strings.Contains(out, "draining") {
		t.Errorf("host-a still draining after undrain:\n%s", out)
	}
	if out := ctl(1, "evacuate", fleet.HostB, "--dry-run"); !strings.Contains(out, "run vtpmctl evacuate on host-b") {
		t.Errorf("evacuating another host than the local vtpmd's:\n%s", out)
	}
}
