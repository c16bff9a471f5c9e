package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
	"github.com/vtpmm/vtpmm/test/fleet/scenarios"
)

func TestParseHookDomain(t *testing.T) {
	tests := []struct {
		file    string
		wantErr error // nil: ours
		anyErr  bool
	}{
		{file: "vtpmm-tpm2.xml"},
		{file: "foreign-secret.xml", wantErr: errNotOurs},
		{file: "unencrypted.xml", wantErr: errNotOurs},
		{file: "passthrough.xml", wantErr: errNotOurs},
		{file: "no-tpm.xml", wantErr: errNotOurs},
		{file: "truncated.xml", anyErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			f, err := os.Open(filepath.Join("testdata", "hook", tc.file))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			d, err := parseHookDomain(f)
			switch {
			case tc.anyErr:
				if err == nil || errors.Is(err, errNotOurs) {
					t.Fatalf("got %v, want a parse error", err)
				}
			case !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil):
				t.Fatalf("got %v, want %v", err, tc.wantErr)
			case err == nil && (d.UUID != "6f1c3a52-0c41-4d1c-9d55-3f1e7c2b9a10" || d.Name != "web-1"):
				t.Fatalf("parsed %+v", d)
			}
		})
	}
}

func FuzzParseHookDomain(f *testing.F) {
	for _, n := range []string{"vtpmm-tpm2.xml", "foreign-secret.xml", "passthrough.xml"} {
		b, err := os.ReadFile(filepath.Join("testdata", "hook", n))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := parseHookDomain(bytes.NewReader(b))
		if err == nil && (d.UUID == "" || d.UUID != strings.ToLower(d.UUID)) {
			t.Fatalf("accepted a domain without a normalised UUID: %+v", d)
		}
	})
}

// TestHookInstall writes the hook and runs it as libvirt would: it must
// exec vtpmctl with the socket and pass libvirt's arguments through.
func TestHookInstall(t *testing.T) {
	dir := t.TempDir()
	var out, errb bytes.Buffer
	err := Run(context.Background(), []string{"hook", "install", "--hooks-dir", dir, "--vtpmctl", "/bin/echo", "--socket", "/run/x y/vtpmd.sock"}, &out, &errb)
	if err != nil {
		t.Fatalf("%v: %s", err, errb.String())
	}
	p := filepath.Join(dir, "qemu.d", hookFileName)
	st, err := os.Stat(p)
	if err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("hook file %s: %v %v", p, st, err)
	}
	got, err := exec.Command(p, "web-1", "migrate", "begin", "-").Output()
	if err != nil {
		t.Fatal(err)
	}
	if want := "hook qemu --socket /run/x y/vtpmd.sock web-1 migrate begin -\n"; string(got) != want {
		t.Fatalf("hook ran %q, want %q", got, want)
	}
	if !strings.Contains(out.String(), "restart libvirtd") {
		t.Fatalf("install output does not say to restart libvirtd: %q", out.String())
	}
	if err := Run(context.Background(), []string{"hook", "install", "--hooks-dir", dir, "--vtpmctl", "bin/vtpmctl"}, &out, &errb); err == nil {
		t.Fatal("a relative vtpmctl path was accepted")
	}
	if err := Run(context.Background(), []string{"hook", "uninstall", "--hooks-dir", dir}, &out, &errb); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("hook still there after uninstall: %v", err)
	}
	// Events the hook does not handle, and domains that are not vtpmm's,
	// exit 0 without contacting vtpmd.
	for _, args := range [][]string{{"web-1", "started", "begin", "-"}, {"web-1", "migrate", "begin", "-"}} {
		if err := runQemuHook(context.Background(), adminapi.NewClient("/nonexistent.sock"), args[1], args[2],
			strings.NewReader("<domain><name>plain</name><uuid>6f1c3a52-0c41-4d1c-9d55-3f1e7c2b9a10</uuid></domain>"), &errb); err != nil {
			t.Fatalf("%v: %v", args, err)
		}
	}
	// vtpmd down: a start goes on with libvirt's secret; an incoming
	// migration is refused (the key cannot be pulled), saying why.
	const vm = "6f1c3a52-0c41-4d1c-9d55-3f1e7c2b9a10"
	down := adminapi.NewClient("/nonexistent.sock")
	if err := runQemuHook(context.Background(), down, "prepare", "begin", strings.NewReader(domainXML("web-1", vm)), &errb); err != nil {
		t.Fatalf("prepare begin without vtpmd: %v", err)
	}
	if err := runQemuHook(context.Background(), down, "migrate", "begin", strings.NewReader(domainXML("web-1", vm)), &errb); !errors.Is(err, adminapi.ErrUnreachable) {
		t.Fatalf("migrate begin without vtpmd: got %v, want adminapi.ErrUnreachable", err)
	}
}

// domainXML is the XML libvirt hands the hook for a vtpmm VM.
func domainXML(name, uuid string) string {
	return fmt.Sprintf(`<domain type='kvm'><name>%s</name><uuid>%s</uuid><devices><tpm model='tpm-crb'>`+
		`<backend type='emulator' version='2.0'><encryption secret='%s'/></backend></tpm></devices></domain>`,
		name, uuid, hypervisor.SecretUUID(uuid))
}

// TestHookModeFleet runs the hook-mode scenario (test/fleet) on the
// in-process fleet (real daemons, real TPMs, the agent wire over mTLS, the
// admin API) with the libvirt-faithful fake hypervisor calling this
// command's hook (runQemuHook, on the domain XML libvirt would pass) where
// libvirt calls it. Then a cold start after the hypervisor forgot its
// ephemeral secrets works through "prepare begin", and a start on a host
// without the key is refused.
func TestHookModeFleet(t *testing.T) {
	ctx := context.Background()
	hook := func(ctx context.Context, socket, op, subop, vm, name string) error {
		var errb bytes.Buffer
		return runQemuHook(ctx, adminapi.NewClient(socket), op, subop, strings.NewReader(domainXML(name, vm)), &errb)
	}
	f, err := inproc.New(ctx, inproc.Config{HookMode: true, Hook: hook})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close(context.Background()) })
	scenarios.HookMode(t, f)

	vm, err := f.CreateVM(ctx, fleet.HostA, "web-2")
	if err != nil {
		t.Fatal(err)
	}
	a, b := f.InProcHost(fleet.HostA).Fake(), f.InProcHost(fleet.HostB).Fake()
	if err := f.Host(fleet.HostA).PlainMigrate(ctx, vm, fleet.HostB); err != nil {
		t.Fatal(err)
	}
	if err := fleet.WaitOwner(ctx, f, vm, fleet.HostB, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := b.DestroyDomain(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if err := b.UndefineSecret(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if err := b.StartDomain(ctx, vm.UUID); err != nil {
		t.Fatalf("cold start on the owner through the hook: %v", err)
	}
	var errb bytes.Buffer
	err = runQemuHook(ctx, adminapi.NewClient(f.InProcHost(fleet.HostA).Config().AdminSocketPath()), "prepare", "begin", strings.NewReader(domainXML("web-2", vm.UUID)), &errb)
	if err == nil || !strings.Contains(err.Error(), "holds no key") || !strings.Contains(err.Error(), "rule key-held") ||
		!strings.Contains(err.Error(), "the registry records host-b as its owner at generation 2") {
		t.Fatalf("start on A, which no longer owns the key: %v", err)
	}
	if has, _ := a.HasSecret(ctx, vm.UUID); has {
		t.Fatal("A defined the secret of a VM it does not own")
	}
}
