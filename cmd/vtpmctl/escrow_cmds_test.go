package main

import (
	"context"
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

// TestEscrowCommands drives backup, host retire and restore as an
// operator types them, on the in-process fleet: backup --all (0 host TPM
// commands), backup without VMs (exit 1), retire of a live host (exit 2),
// restore while the owner lives and with one custodian (exit 2, each
// naming why), then the owner's TPM lost, the host retired (the VM
// listed), the restore onto host-a with two custodians (exit 0) and the
// same bundle again (stale: exit 2).
func TestEscrowCommands(t *testing.T) {
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
	vm, err := f.CreateVM(ctx, fleet.HostB, "vault-vm")
	if err != nil {
		t.Fatal(err)
	}
	sockA := f.InProcHost(fleet.HostA).Config().AdminSocketPath()
	sockB := f.InProcHost(fleet.HostB).Config().AdminSocketPath()
	op := []string{"--socket", sockA, "--pki", f.PKIDir()}
	ctl := ctlWant(t)
	out := filepath.Join(dir, "bundles")
	if s := ctl(0, "backup", "--all", "-o", out, "--socket", sockB); !strings.Contains(s, "1 bundles") || !strings.Contains(s, "0 host TPM commands") {
		t.Errorf("backup --all:\n%s", s)
	}
	ctl(1, "backup", "--socket", sockB)
	files, err := escrow.Layout{Dir: out}.List(vm.UUID)
	if err != nil || len(files) != 1 {
		t.Fatalf("bundles of %s: %v, %v", vm.Name, files, err)
	}
	bundle := files[0].Path
	restore := append([]string{"restore", bundle, "--to", fleet.HostA, "--identity", keys["alice"]}, op...)
	if s := ctl(2, append(restore, "--identity", keys["carol"])...); !strings.Contains(s, "host-b is live") {
		t.Errorf("restore while host-b lives:\n%s", s)
	}
	if s := ctl(2, append(append([]string{}, op...), "host", "retire", fleet.HostB)...); !strings.Contains(s, "liveness lease") {
		t.Errorf("retire of a live host:\n%s", s)
	}
	if err := f.InProcHost(fleet.HostB).LoseTPM(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, s, e := runCtl(t, append([]string{"host", "retire", fleet.HostB}, op...)...)
		if code == 0 {
			if !strings.Contains(s, vm.UUID) || !strings.Contains(s, "fenced for good") {
				t.Errorf("retire:\n%s", s)
			}
			break
		}
		if code != 2 || time.Now().After(deadline) {
			t.Fatalf("retire after the loss: exit %d\n%s%s", code, s, e)
		}
		time.Sleep(250 * time.Millisecond)
	}
	if s := ctl(2, restore...); !strings.Contains(s, "1 more needed from the custodians bob, carol") {
		t.Errorf("restore with one custodian:\n%s", s)
	}
	if s := ctl(0, append(restore, "--identity", keys["carol"])...); !strings.Contains(s, "onto host-a (was host-b) at generation 2") {
		t.Errorf("restore:\n%s", s)
	}
	if s := ctl(2, append(restore, "--identity", keys["bob"])...); !strings.Contains(s, "older than the VM's current generation") {
		t.Errorf("restore of the older bundle again:\n%s", s)
	}
}
