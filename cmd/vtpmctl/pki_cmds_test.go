package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// runCtl runs vtpmctl through Run and returns its exit code and output.
func runCtl(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	err := Run(context.Background(), args, &out, &errOut)
	return exitCode(err), out.String(), errOut.String()
}

// ctlWant returns a runner of vtpmctl that fails the test unless the
// command exits with want; extra is appended to every command's arguments
// (--socket, --pki). It returns stdout and stderr together.
func ctlWant(t *testing.T, extra ...string) func(want int, args ...string) string {
	return func(want int, args ...string) string {
		t.Helper()
		code, out, errOut := runCtl(t, append(args, extra...)...)
		if code != want {
			t.Fatalf("vtpmctl %s: exit %d, want %d\n%s%s", strings.Join(args, " "), code, want, out, errOut)
		}
		return out + errOut
	}
}

// requireWired skips when root.go does not add the command group yet.
func requireWired(t *testing.T, group string) {
	t.Helper()
	if _, _, stderr := runCtl(t, group, "--help"); strings.Contains(stderr, "unknown command") {
		t.Skipf("%q commands are not added to the root command in root.go yet", group)
	}
}

func TestPKICommands(t *testing.T) {
	requireWired(t, "pki")
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	out := filepath.Join(dir, "certs")
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantOut    []string
		wantErrOut []string
		wantFiles  []string
	}{
		{"init", []string{"pki", "init", "--dir", ca, "--name", "lab CA"}, 0,
			[]string{`CA "lab CA" created`, filepath.Join(ca, "ca.crt"), "SHA-256"}, nil, []string{"ca/ca.crt", "ca/ca.key"}},
		{"init refuses to overwrite", []string{"pki", "init", "--dir", ca}, 1, nil, []string{"already exists"}, nil},
		{"init needs --dir", []string{"pki", "init"}, 1, nil, []string{`required flag(s) "dir"`}, nil},
		{"issue into the CA dir", []string{"pki", "issue", "host-a", "--dir", ca}, 0,
			[]string{"certificate for host-a issued by \"lab CA\"", "host-a, 127.0.0.1, ::1"}, nil, []string{"ca/host-a.crt", "ca/host-a.key"}},
		{"issue with names and IPs", []string{"pki", "issue", "host-b", "--dir", ca, "--out", out, "--dns", "host-b.lab", "--ip", "10.0.0.2", "--ip", "fd00::2"}, 0,
			[]string{"host-b, host-b.lab, 10.0.0.2, fd00::2"}, nil, []string{"certs/host-b.crt", "certs/host-b.key"}},
		{"issue refuses to overwrite", []string{"pki", "issue", "host-b", "--dir", ca, "--out", out}, 1, nil, []string{"already exists", "--force"}, nil},
		{"issue --force", []string{"pki", "issue", "host-b", "--dir", ca, "--out", out, "--force"}, 0, []string{"host-b, 127.0.0.1, ::1"}, nil, nil},
		{"bad IP", []string{"pki", "issue", "host-c", "--dir", ca, "--ip", "10.0.0"}, 1, nil, []string{`--ip "10.0.0": not an IP address`}, nil},
		{"bad host", []string{"pki", "issue", "../x", "--dir", ca}, 1, nil, []string{"invalid host name"}, nil},
		{"missing CA", []string{"pki", "issue", "host-c", "--dir", filepath.Join(dir, "nope")}, 1, nil, []string{"no such file"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runCtl(t, tt.args...)
			if code != tt.wantCode {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tt.wantCode, stdout, stderr)
			}
			for _, w := range tt.wantOut {
				if !strings.Contains(stdout, w) {
					t.Errorf("stdout lacks %q:\n%s", w, stdout)
				}
			}
			for _, w := range tt.wantErrOut {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr)
				}
			}
			if strings.Contains(stdout+stderr, "PRIVATE KEY") {
				t.Error("a private key was printed")
			}
			for _, f := range tt.wantFiles {
				st, err := os.Stat(filepath.Join(dir, f))
				if err != nil {
					t.Error(err)
				} else if st.Mode().Perm() != 0o600 {
					t.Errorf("%s mode %v", f, st.Mode().Perm())
				}
			}
		})
	}
}
