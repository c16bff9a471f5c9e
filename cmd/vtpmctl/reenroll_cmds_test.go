package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/migrate/escrow"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// TestReenrollCommand drives 'vtpmctl host reenroll' as an operator types
// it: refused for a host on its enrolled TPM (exit 2, nothing to replace)
// and an unknown one (exit 2), exit 6 when the registry cannot be
// reached; then host-b's TPM is lost and replaced (vtpmd init): 'host
// enroll' still refuses it (rule enrolled-once, naming 'host reenroll'),
// 'host reenroll' refuses it until it is retired (exit 2, rule
// reenroll-needs-retired; retire --force, since it is live again), then
// replaces its identity (exit 0, naming
// the old and new EK), a second one finds nothing to replace (exit 2), and its VM is
// restored onto it (restore --to host-b --force, exit 0).
func TestReenrollCommand(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cfg := escrow.Config{Threshold: 2}
	keys := map[string]string{}
	for _, name := range []string{"alice", "bob", "carol"} {
		id, err := age.GenerateX25519Identity()
		if err != nil {
			t.Fatal(err)
		}
		keys[name] = filepath.Join(dir, name+".key")
		if err := os.WriteFile(keys[name], []byte(id.String()+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg.Custodians = append(cfg.Custodians, escrow.CustodianConfig{Name: name, Recipients: []string{id.Recipient().String()}})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	f, err := inproc.New(ctx, inproc.Config{Configure: func(_ string, c *daemon.Config) { c.Escrow = cfg }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close(context.Background()) })
	vm, err := f.CreateVM(ctx, fleet.HostB, "db")
	if err != nil {
		t.Fatal(err)
	}
	sockA := f.InProcHost(fleet.HostA).Config().AdminSocketPath()
	sockB := f.InProcHost(fleet.HostB).Config().AdminSocketPath()
	op := []string{"--socket", sockA, "--pki", f.PKIDir()}
	ctl := ctlWant(t)
	out := filepath.Join(dir, "bundles")
	ctl(0, "backup", vm.Name, "-o", out, "--socket", sockB)
	files, err := escrow.Layout{Dir: out}.List(vm.UUID)
	if err != nil || len(files) != 1 {
		t.Fatalf("bundles of %s: %v, %v", vm.Name, files, err)
	}

	reenroll := append([]string{"host", "reenroll", fleet.HostB, "--wait", "20s"}, op...)
	if s := ctl(2, reenroll...); !strings.Contains(s, "nothing to replace (rule reenroll-new-identity)") {
		t.Errorf("reenroll of a host on its enrolled TPM:\n%s", s)
	}
	if s := ctl(2, append([]string{"host", "reenroll", "host-z"}, op...)...); !strings.Contains(s, "rule enrolled") {
		t.Errorf("reenroll of an unknown host:\n%s", s)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "https://" + lis.Addr().String()
	lis.Close()
	if s := ctl(6, append(append([]string{}, reenroll...), "--registry", dead, "--registry-timeout", "1s")...); !strings.Contains(s, "no quorum") {
		t.Errorf("reenroll without a registry:\n%s", s)
	}

	// host-b's TPM is replaced before the operator retired it: its new
	// TPM is not enrolled until it is (rule reenroll-needs-retired); a
	// host back and live is retired with --force.
	b := f.InProcHost(fleet.HostB)
	if err := b.LoseTPM(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.ReplaceTPM(ctx); err != nil {
		t.Fatal(err)
	}
	// The first enrolment's path is unchanged: it refuses the new TPM once
	// host-b registered it, and points at reenroll.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(250 * time.Millisecond) {
		code, s, e := runCtl(t, append([]string{"host", "enroll", fleet.HostB}, op...)...)
		if code != 0 && strings.Contains(s+e, "rule enrolled-once") {
			if !strings.Contains(s+e, "vtpmctl host reenroll") {
				t.Errorf("host enroll of a replaced TPM:\n%s%s", s, e)
			}
			break
		}
		if code == 0 || time.Now().After(deadline) {
			t.Fatalf("host enroll of a replaced TPM: exit %d\n%s%s", code, s, e)
		}
	}
	if s := ctl(2, reenroll...); !strings.Contains(s, "rule reenroll-needs-retired") || !strings.Contains(s, "vtpmctl host retire host-b") {
		t.Errorf("reenroll of a host not retired:\n%s", s)
	}
	ctl(0, append([]string{"host", "retire", fleet.HostB, "--force"}, op...)...)
	s := ctl(0, reenroll...)
	if !strings.Contains(s, "host-b re-enrolled in the fleet registry by root") || !strings.Contains(s, "(never trusted again)") || !strings.Contains(s, "host-b is active") {
		t.Errorf("reenroll:\n%s", s)
	}
	if s := ctl(2, reenroll...); !strings.Contains(s, "nothing to replace (rule reenroll-new-identity)") {
		t.Errorf("reenroll again:\n%s", s)
	}
	restore := append([]string{"restore", files[0].Path, "--to", fleet.HostB, "--identity", keys["alice"], "--identity", keys["carol"]}, op...)
	if s := ctl(2, restore...); !strings.Contains(s, "current owner") {
		t.Errorf("restore onto the owner without --force:\n%s", s)
	}
	if s := ctl(0, append(restore, "--force")...); !strings.Contains(s, "at generation 2") {
		t.Errorf("restore onto the re-enrolled host-b:\n%s", s)
	}
}
