package main

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/vtpmm/vtpmm/internal/guestseal"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

func TestRun(t *testing.T) {
	t.Parallel()
	// The CLI opens the TPM itself; swtpm serves one connection at a time.
	h := tpmtest.StartHost(t)
	secretFile := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secretFile, []byte("luks key"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	uri := h.URI()
	for _, tc := range []struct {
		name    string
		args    []string
		want    error
		wantOut string
	}{
		{"no command", []string{"--tpm", uri}, errUsage, ""},
		{"unknown command", []string{"--tpm", uri, "frob"}, errUsage, ""},
		{"seal without file", []string{"--tpm", uri, "seal"}, errUsage, ""},
		{"bad pcrs", []string{"--tpm", uri, "seal", "--secret-file", secretFile, "--pcrs", "16,x"}, errUsage, ""},
		{"unseal before seal", []string{"--tpm", uri, "unseal"}, guestseal.ErrNotSealed, ""},
		{"seal", []string{"--tpm", uri, "seal", "--secret-file", secretFile, "--pcrs", "7,16"}, nil, ""},
		{"unseal", []string{"--tpm", uri, "unseal"}, nil, "luks key"},
	} {
		var out, errb bytes.Buffer
		err := Run(ctx, tc.args, &out, &errb)
		if !errors.Is(err, tc.want) {
			t.Fatalf("%s: Run = %v, want %v (stderr %q)", tc.name, err, tc.want, errb.String())
		}
		if out.String() != tc.wantOut {
			t.Errorf("%s: stdout %q, want %q", tc.name, out.String(), tc.wantOut)
		}
	}
}

func TestStaticBuild(t *testing.T) {
	t.Parallel()
	bin := filepath.Join(t.TempDir(), "vtpmm-guest")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("CGO_ENABLED=0 go build: %v\n%s", err, out)
	}
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Errorf("binary is dynamically linked (%v program header)", p.Type)
		}
	}
}
