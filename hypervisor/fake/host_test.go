package fake_test

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/fake"
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
)

// TestDomainLifecycle walks one VM through libvirt's cold-start rules: the
// secret is read at start (missing: ErrSecretMissing, other value:
// ErrSecretMismatch), and only then.
func TestDomainLifecycle(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t)
	_, hosts := newHosts(t, "a", "b")
	a, b := hosts[0], hosts[1]
	v := vm{uuid: newUUID(t), key: randBytes(t, 32)}
	v.state = filepath.Join(tmpDir(t, "vm-"), "tpm2")
	if err := swtpm.Setup(ctx, swtpm.SetupConfig{StateDir: v.state, VMID: v.uuid, Passphrase: v.key}); err != nil {
		t.Fatal(err)
	}
	if err := a.DefineVTPMDomain(ctx, hypervisor.Domain{UUID: v.uuid, Name: "vm42"}, v.state); err != nil {
		t.Fatal(err)
	}
	// b already has a domain of that UUID (on some other state).
	other := tmpDir(t, "other-")
	if err := os.WriteFile(filepath.Join(other, "tpm2-00.permall"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := b.DefineVTPMDomain(ctx, hypervisor.Domain{UUID: v.uuid, Name: "vm42"}, other); err != nil {
		t.Fatal(err)
	}
	defineSecret(t, b, v.uuid, v.key)

	start := func() error { return a.StartDomain(ctx, v.uuid) }
	for _, step := range []struct {
		name  string
		do    func() error
		want  error
		msg   string
		state hypervisor.State
	}{
		{name: "start without secret", do: start, want: hypervisor.ErrSecretMissing,
			msg: "Secret not found: no secret with matching uuid '" + v.uuid + "'", state: hypervisor.StateShutoff},
		{name: "migrate shut-off VM", do: func() error { return a.Migrate(ctx, v.uuid, b.Target()) },
			want: hypervisor.ErrNotRunning, state: hypervisor.StateShutoff},
		{name: "destroy shut-off VM", do: func() error { return a.DestroyDomain(ctx, v.uuid) },
			want: hypervisor.ErrNotRunning, state: hypervisor.StateShutoff},
		{name: "start with wrong secret", do: func() error {
			defineSecret(t, a, v.uuid, randBytes(t, 32))
			return start()
		}, want: hypervisor.ErrSecretMismatch, state: hypervisor.StateShutoff},
		{name: "start with the right secret", do: func() error {
			defineSecret(t, a, v.uuid, v.key)
			return start()
		}, state: hypervisor.StateRunning},
		{name: "start running VM", do: start, want: fake.ErrDomainActive, state: hypervisor.StateRunning},
		{name: "undefine running VM", do: func() error { return a.UndefineDomain(ctx, v.uuid) },
			want: fake.ErrDomainActive, state: hypervisor.StateRunning},
		{name: "migrate to itself", do: func() error { return a.Migrate(ctx, v.uuid, a.Target()) },
			want: hypervisor.ErrMigrationFailed, msg: "same host", state: hypervisor.StateRunning},
		{name: "migrate to a foreign URI", do: func() error {
			return a.Migrate(ctx, v.uuid, hypervisor.Target{URI: "qemu+tcp://10.251.0.2/system"})
		}, want: hypervisor.ErrUnreachable, state: hypervisor.StateRunning},
		{name: "migrate where the domain exists", do: func() error { return a.Migrate(ctx, v.uuid, b.Target()) },
			want: hypervisor.ErrAlreadyExists, state: hypervisor.StateRunning},
		{name: "secret removed while running", do: func() error {
			if err := a.UndefineSecret(ctx, v.uuid); err != nil {
				return err
			}
			guest(t, a, v.uuid, func(tpm transport.TPM) {
				if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); err != nil {
					t.Errorf("vTPM after the secret was removed: %v", err)
				}
			})
			return nil
		}, state: hypervisor.StateRunning},
		{name: "destroy", do: func() error { return a.DestroyDomain(ctx, v.uuid) }, state: hypervisor.StateShutoff},
		{name: "restart after the secret was removed", do: start, want: hypervisor.ErrSecretMissing, state: hypervisor.StateShutoff},
		{name: "undefine", do: func() error { return a.UndefineDomain(ctx, v.uuid) }, state: hypervisor.StateAbsent},
		{name: "start undefined VM", do: start, want: hypervisor.ErrNoDomain, state: hypervisor.StateAbsent},
	} {
		err := step.do()
		if !errors.Is(err, step.want) || (err == nil) != (step.want == nil) {
			t.Fatalf("%s: %v; want %v", step.name, err, step.want)
		}
		if err != nil && !strings.Contains(err.Error(), step.msg) {
			t.Errorf("%s: error %q does not say %q", step.name, err, step.msg)
		}
		d, derr := a.Domain(ctx, v.uuid)
		if derr != nil || d.State != step.state {
			t.Fatalf("%s: Domain = %+v, %v; want %s", step.name, d, derr, step.state)
		}
		ds, derr := a.Domains(ctx)
		if wantN := map[bool]int{true: 0, false: 1}[step.state == hypervisor.StateAbsent]; derr != nil || len(ds) != wantN {
			t.Fatalf("%s: Domains = %+v, %v; want %d", step.name, ds, derr, wantN)
		}
		t.Logf("%s: %v", step.name, err)
	}
	if _, err := os.Stat(v.state); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state dir after undefine: %v; want removed (libvirt without --keep-tpm)", err)
	}
}

// TestConfigErrors covers refusals that need no running vTPM.
func TestConfigErrors(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t)
	n, hosts := newHosts(t, "a")
	a := hosts[0]
	uuid := newUUID(t)
	injected := errors.New("secret driver down")
	for _, tc := range []struct {
		name string
		do   func() error
		want error
	}{
		{"duplicate host", func() error {
			_, err := n.AddHost(ctx, fake.HostConfig{Name: "a", Dir: tmpDir(t, "dup-")})
			return err
		}, fake.ErrHostExists},
		{"host dir with a comma", func() error {
			_, err := n.AddHost(ctx, fake.HostConfig{Name: "c", Dir: "/tmp/a,b"})
			return err
		}, fake.ErrBadConfig},
		{"host without name", func() error {
			_, err := n.AddHost(ctx, fake.HostConfig{Dir: tmpDir(t, "noname-")})
			return err
		}, fake.ErrBadConfig},
		{"down: unknown host", func() error { return n.SetDown("nowhere", true) }, fake.ErrBadConfig},
		{"define without state", func() error {
			return a.DefineVTPMDomain(ctx, hypervisor.Domain{UUID: uuid, Name: "vm"}, tmpDir(t, "empty-"))
		}, fake.ErrBadConfig},
		{"define with a bad UUID", func() error {
			return a.DefineVTPMDomain(ctx, hypervisor.Domain{UUID: "vm42", Name: "vm"}, tmpDir(t, "empty-"))
		}, fake.ErrBadConfig},
		{"migrate unknown VM", func() error { return a.Migrate(ctx, uuid, hypervisor.Target{Name: "b"}) }, hypervisor.ErrNoDomain},
		{"destroy unknown VM", func() error { return a.DestroyDomain(ctx, uuid) }, hypervisor.ErrNoDomain},
		{"undefine unknown VM", func() error { return a.UndefineDomain(ctx, uuid) }, hypervisor.ErrNoDomain},
		{"vTPM of unknown VM", func() error { _, err := a.VTPMURI(uuid); return err }, hypervisor.ErrNoDomain},
		{"empty secret", func() error { return a.DefineSecret(ctx, uuid, nil) }, fake.ErrBadConfig},
		{"FailDefineSecret", func() error {
			a.FailDefineSecret = injected
			defer func() { a.FailDefineSecret = nil }()
			return a.DefineSecret(ctx, uuid, []byte("k"))
		}, injected},
		{"undefine missing secret", func() error { return a.UndefineSecret(ctx, uuid) }, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.do(); !errors.Is(err, tc.want) || (err == nil) != (tc.want == nil) {
				t.Fatalf("%v; want %v", err, tc.want)
			}
		})
	}
	if ok, err := a.HasSecret(ctx, uuid); ok || err != nil {
		t.Errorf("HasSecret after a failed DefineSecret = %v, %v", ok, err)
	}
	if tg := a.Target(); tg.Name != "a" || tg.URI != "fake://a" {
		t.Errorf("Target = %+v", tg)
	}
}

// TestSecretNeverOnDisk: the VM key shows up in no file of either host or
// of the VM's state, in any common encoding, after a start and a migration.
func TestSecretNeverOnDisk(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t)
	_, hosts := newHosts(t, "a", "b")
	a, b := hosts[0], hosts[1]
	v := newVM(t, a)
	defineSecret(t, b, v.uuid, v.key)
	bootAndSeal(t, a, v.uuid, []byte("disk key"))
	if err := a.Migrate(ctx, v.uuid, b.Target()); err != nil {
		t.Fatal(err)
	}
	forms := [][]byte{v.key, []byte(hex.EncodeToString(v.key)), []byte(base64.StdEncoding.EncodeToString(v.key))}
	files := 0
	for _, root := range []string{a.Dir(), b.Dir(), filepath.Dir(v.state)} {
		err := filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
			if err != nil || !e.Type().IsRegular() {
				return err
			}
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			files++
			for _, f := range forms {
				if bytes.Contains(data, f) {
					t.Errorf("VM key found in %s", p)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if files == 0 {
		t.Fatal("no files checked")
	}
	t.Logf("%d files checked", files)
}
