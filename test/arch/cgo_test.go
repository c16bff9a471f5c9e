package arch

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// goTool is the go command that runs this test.
func goTool(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	p := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("no go command: %v", err)
	}
	return p
}

// goCmd runs the go command in the module root with extra environment.
func goCmd(t *testing.T, env []string, args ...string) string {
	t.Helper()
	cmd := exec.Command(goTool(t), args...)
	cmd.Dir = "../.."
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestCLIWithoutCgo: the operator CLI (the portable verifier and the
// libvirt hook) builds with CGO_ENABLED=0 and links neither libvirt nor a
// TPM simulator; the guest tool too.
func TestCLIWithoutCgo(t *testing.T) {
	for _, pkg := range []string{"./cmd/vtpmctl", "./cmd/vtpmm-guest"} {
		goCmd(t, []string{"CGO_ENABLED=0"}, "build", "-o", os.DevNull, pkg)
		for _, dep := range strings.Fields(goCmd(t, []string{"CGO_ENABLED=0"}, "list", "-deps", pkg)) {
			if strings.Contains(dep, "libvirt") || strings.HasSuffix(dep, "/vtpm/tpmsim") ||
				strings.Contains(dep, "go-tpm-tools/simulator") {
				t.Errorf("%s depends on %s", pkg, dep)
			}
		}
	}
	// The same with cgo on: nothing pulls them in through a cgo-only file.
	for _, dep := range strings.Fields(goCmd(t, nil, "list", "-deps", "./cmd/vtpmctl")) {
		if strings.Contains(dep, "libvirt") || strings.Contains(dep, "simulator") || strings.HasSuffix(dep, "/vtpm/tpmsim") {
			t.Errorf("vtpmctl depends on %s", dep)
		}
	}
}
