package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/test/lab"
)

// TestDemo runs the whole demo on freshly built binaries, as 'make demo'
// does, so the quick start's main command is covered by 'make test'. Like
// the e2e tests it needs root, libvirt, QEMU and swtpm ('make deps'
// installs them). It skips only when one of them is missing, and fails
// instead when VTPMM_E2E_REQUIRE=1. On a machine that has them, a broken
// demo fails the test.
func TestDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("builds binaries and runs the full demo")
	}
	if err := lab.Require(); err != nil {
		if os.Getenv("VTPMM_E2E_REQUIRE") == "1" {
			t.Fatalf("VTPMM_E2E_REQUIRE=1: %v", err)
		}
		t.Skip(err)
	}
	bin := t.TempDir()
	for _, b := range []struct {
		env  string
		pkgs []string
	}{
		{"", []string{"../../cmd/vtpmd", "../lab/cmd/subreaper"}},
		{"CGO_ENABLED=0", []string{"../../cmd/vtpmctl", "../../cmd/vtpmm-guest"}},
	} {
		build := exec.Command("go", append([]string{"build", "-o", bin + "/"}, b.pkgs...)...)
		build.Env = append(os.Environ(), b.env)
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("build: %v\n%s", err, out)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	t0 := time.Now()
	var out, errb bytes.Buffer
	err := Run(ctx, []string{"--bin", bin}, &out, &errb)
	if err != nil {
		t.Fatalf("demo failed after %v: %v\nstdout:\n%s\nstderr:\n%s", time.Since(t0).Round(time.Millisecond), err, out.String(), errb.String())
	}
	t.Logf("demo took %v:\n%s", time.Since(t0).Round(time.Millisecond), out.String())
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if last := lines[len(lines)-1]; !strings.HasPrefix(last, "DEMO OK") {
		t.Fatalf("last line %q does not start with DEMO OK", last)
	}
	for _, want := range []string{
		// Part 1: bind.
		"sealed by a different TPM", "does not decrypt with this passphrase", "PCR 7 changed", "survived the restart",
		// Part 2: libvirt.
		"host-a console | VTPMM-SEALED", "host-b console | VTPMM-UNSEAL", "hypervisor", "commit",
		"same secret", "only host-b owns (generation 2)",
		"registry bootstrapped", "enrolled in the fleet registry", "3 enrolments for 3 hosts", "vm list --fleet on host-b, after the migration",
		"2 etcd round trips", "registry (revision",
		"refused (exit 2)", "rule pcr-policy", "host-c: no libvirt secret, no domain, no key file",
		"chain intact", "none found", "no namespace and no process of the demo is left",
		// Part 2: evacuation and recovery.
		"evacuation of host-a: 2 moved", "db-1 and db-2 run on host-b at generation 2",
		// Part 2: failover, then recovery after host-a's TPM loss.
		"promotion", "host-a console | VTPMM-FOUND", "host-a owns web-1 at generation 3", "host-a fenced for good",
		"bob alone: refused (exit 2)", "host-b console | VTPMM-FOUND", "after the TPM loss; host-b owns web-1 at generation 4",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
}
