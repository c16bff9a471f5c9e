package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
)

// TestRegistryRestore: 'vtpmd registry restore' builds this host's member
// from a snapshot of a real registry, for the configured members, and
// refuses to overwrite an existing member directory.
func TestRegistryRestore(t *testing.T) {
	t.Parallel()
	c := registrytest.Start(t, registrytest.Options{Members: 1})
	op := c.Open(t, "root")
	registrytest.Enroll(t, op, "host-a")
	if _, err := op.CreateVM(t.Context(), "vm-1", "host-a"); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	snap := filepath.Join(dir, "registry.snap")
	f, err := os.Create(snap)
	if err != nil {
		t.Fatal(err)
	}
	if err := op.Snapshot(t.Context(), f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	cert, key := c.Cert("host-a")
	m := c.NewMember("host-a")
	conf := fmt.Sprintf(`host_id: host-a
data_dir: %s/data
run_dir: %s/run
tpm: swtpm+tcp://127.0.0.1:1
listen: 127.0.0.1:7450
tls: {ca: %s, cert: %s, key: %s}
registry:
  mode: embedded
  embedded:
    members:
      - {name: host-a, peer_url: %q, client_url: %q}
`, dir, dir, c.CAFile, cert, key, m.PeerURL, m.ClientURL)
	cfg := filepath.Join(dir, "vtpmd.yaml")
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) (string, error) {
		var out, errb bytes.Buffer
		err := Run(context.Background(), append([]string{"--config", cfg}, args...), nil, &out, &errb, Deps{})
		return out.String(), err
	}
	out, err := run("registry", "restore", snap)
	if err != nil || !strings.Contains(out, "restored") {
		t.Fatalf("restore: %q %v", out, err)
	}
	if ents, err := os.ReadDir(filepath.Join(dir, "data", "registry")); err != nil || len(ents) == 0 {
		t.Fatalf("member directory: %v %v", ents, err)
	}
	if _, err := run("registry", "restore", snap); err == nil || !strings.Contains(err.Error(), "new directory") {
		t.Fatalf("restore over an existing member: %v", err)
	}
}
