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

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/devfleet"
	"github.com/vtpmm/vtpmm/vtpm"
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

// TestHookModeFleet runs hook mode through real daemons (real TPMs, the
// agent wire over mTLS, the admin API) with the libvirt-faithful fake
// hypervisor calling 'vtpmctl hook qemu' where libvirt calls its hook: a
// plain hypervisor migration to a trusted host moves the key; one to an
// untrusted host fails in the hook with the attestation rule.
func TestHookModeFleet(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for swtpm hosts")
	}
	ctx := context.Background()
	root, err := os.MkdirTemp("/tmp", "hookfleet-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	const goodLog = "../../vtpm/emuhost/testdata/gce-cos-85.eventlog.bin"
	const badLog = "../../attest/testdata/realworld/eventlogs/ubuntu-2104-no-secure-boot.bin"
	cfg, err := devfleet.Provision(root, []string{"host-a", "host-b", "host-c"}, goodLog)
	if err != nil {
		t.Fatal(err)
	}
	f := devfleet.New(cfg)
	t.Cleanup(func() { _ = f.Close(context.Background()) })
	for _, h := range []struct{ name, log string }{{"host-a", goodLog}, {"host-b", goodLog}, {"host-c", badLog}} {
		if _, err := f.AddHost(ctx, h.name, h.log); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := f.EnrollAll(ctx); err != nil {
		t.Fatal(err)
	}
	names := map[string]string{}
	for _, h := range f.Hosts {
		sock := h.Cfg.AdminSocketPath()
		h.Hyp.MigrateBegin = func(ctx context.Context, vm, name string) error {
			var errb bytes.Buffer
			return runQemuHook(ctx, adminapi.NewClient(sock), "migrate", "begin", strings.NewReader(domainXML(name, vm)), &errb)
		}
		h.Hyp.PrepareBegin = func(ctx context.Context, vm, name string) error {
			var errb bytes.Buffer
			return runQemuHook(ctx, adminapi.NewClient(sock), "prepare", "begin", strings.NewReader(domainXML(name, vm)), &errb)
		}
		h.Hyp.Released = func(vm string) {
			var errb bytes.Buffer
			if err := runQemuHook(ctx, adminapi.NewClient(sock), "release", "end", strings.NewReader(domainXML(names[vm], vm)), &errb); err != nil {
				t.Errorf("release hook: %v", err)
			}
		}
	}
	a, b, c := f.Hosts["host-a"], f.Hosts["host-b"], f.Hosts["host-c"]
	vm, err := a.CreateRunningVM(ctx, "web-1")
	if err != nil {
		t.Fatal(err)
	}
	names[vm] = "web-1"

	t0 := time.Now()
	if err := a.Hyp.Migrate(ctx, vm, b.Hyp.Target()); err != nil {
		t.Fatalf("plain migration A→B through the hook: %v", err)
	}
	t.Logf("plain migration A→B with the hook: %v", time.Since(t0))
	// The source settles in the background after "release end".
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, _, errA := a.Daemon.Host().Keys().Get(ctx, vm)
		_, _, errB := b.Daemon.Host().Keys().Get(ctx, vm)
		if errors.Is(errA, vtpm.ErrKeyNotFound) && errB == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not settled: key on A: %v, on B: %v", errA, errB)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("settled (B owns the key) %v after the migration started", time.Since(t0))

	// A cold start after the hypervisor forgot its ephemeral secrets (as
	// libvirtd does when it restarts): "prepare begin" has vtpmd define
	// the secret from its vault. A host without the key refuses the start.
	if err := b.Hyp.DestroyDomain(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if err := b.Hyp.UndefineSecret(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if err := b.Hyp.StartDomain(ctx, vm); err != nil {
		t.Fatalf("cold start on the owner through the hook: %v", err)
	}
	var errb bytes.Buffer
	err = runQemuHook(ctx, adminapi.NewClient(a.Cfg.AdminSocketPath()), "prepare", "begin", strings.NewReader(domainXML("web-1", vm)), &errb)
	if err == nil || !strings.Contains(err.Error(), "holds no key") {
		t.Fatalf("start on A, which no longer owns the key: %v", err)
	}

	err = b.Hyp.Migrate(ctx, vm, c.Hyp.Target())
	if !errors.Is(err, hypervisor.ErrHookRefused) || !strings.Contains(err.Error(), string(attest.RulePCRPolicy)) {
		t.Fatalf("plain migration B→C (untrusted): got %v, want a hook refusal naming %s", err, attest.RulePCRPolicy)
	}
	t.Logf("B→C refused: %v", err)
	if d, _ := b.Hyp.Domain(ctx, vm); d.State != hypervisor.StateRunning {
		t.Fatalf("VM on B after the refusal: %s", d.State)
	}
	if ok, _ := c.Hyp.HasSecret(ctx, vm); ok {
		t.Fatal("untrusted C has the VM's secret")
	}
	if _, _, err := c.Daemon.Host().Keys().Get(ctx, vm); err == nil {
		t.Fatal("untrusted C holds the VM's key")
	}
}
