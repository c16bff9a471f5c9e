package main

import (
	"bytes"
	"context"
	"os/exec"
	"strings"
	"testing"
)

// TestDemo runs the whole demo on freshly built binaries, as 'make demo'
// does, so the quick start's main command is covered by 'make test'.
func TestDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("builds binaries and runs the full demo")
	}
	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin+"/", "../vtpmd", "../vtpmctl", "../vtpmm-guest")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	var out, errb bytes.Buffer
	err := Run(context.Background(), []string{"--bin", bin,
		"--boot-log", "../../vtpm/emuhost/testdata/gce-cos-85.eventlog.bin",
		"--tampered-log", "../../attest/testdata/realworld/eventlogs/ubuntu-2104-no-secure-boot.bin"}, &out, &errb)
	if err != nil {
		t.Fatalf("demo failed: %v\nstdout:\n%s\nstderr:\n%s", err, out.String(), errb.String())
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if last := lines[len(lines)-1]; !strings.HasPrefix(last, "DEMO OK") {
		t.Fatalf("last line %q does not start with DEMO OK", last)
	}
	for _, want := range []string{"sealed by a different TPM", "does not decrypt with this passphrase", "PCR 7 changed", "survived the restart",
		"the guest unseals", "none found", "refused (exit 2)", "rule pcr-policy", "received no key bytes", "chain intact"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
}
