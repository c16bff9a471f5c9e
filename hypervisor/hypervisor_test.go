package hypervisor

import (
	"context"
	"errors"
	"regexp"
	"testing"
)

func TestSecretUUID(t *testing.T) {
	vm := "0e2e0e2e-0000-4000-8000-000000000001"
	a, b := SecretUUID(vm), SecretUUID("0E2E0E2E-0000-4000-8000-000000000001")
	uuid := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	if a != b || !uuid.MatchString(a) || a == vm || SecretUUID("0e2e0e2e-0000-4000-8000-000000000002") == a {
		t.Fatalf("SecretUUID = %s / %s", a, b)
	}
	// The derivation is in every domain's XML: it must never change.
	if want := "15f49ab6-4fbb-8cc1-b826-c9461f5a58fb"; a != want {
		t.Fatalf("SecretUUID(%s) = %s, want %s", vm, a, want)
	}
}

type fakeHyp struct{ None }

func TestRegistry(t *testing.T) {
	ctx := context.Background()
	r := NewRegistry()
	var got Config
	r.Register("qemu", func(_ context.Context, c Config) (Hypervisor, error) { got = c; return fakeHyp{}, nil })
	h, err := r.Open(ctx, Config{URI: "qemu:///system", Name: "host-a"})
	if err != nil || got.URI != "qemu:///system" || got.Name != "host-a" {
		t.Fatalf("Open: %v %+v", err, got)
	}
	if _, ok := h.(fakeHyp); !ok {
		t.Fatalf("Open returned %T", h)
	}
	if h, err := r.Open(ctx, Config{}); err != nil || !IsNone(h) {
		t.Fatalf("empty URI: %v %T, want None", err, h)
	}
	for _, uri := range []string{"xen:///system", "no scheme"} {
		if _, err := r.Open(ctx, Config{URI: uri}); !errors.Is(err, ErrUnknownScheme) {
			t.Errorf("Open(%q): %v, want ErrUnknownScheme", uri, err)
		}
	}
	var nilReg *Registry
	if _, err := nilReg.Open(ctx, Config{URI: "qemu:///system"}); !errors.Is(err, ErrUnknownScheme) {
		t.Errorf("nil registry: %v", err)
	}
}

func TestNone(t *testing.T) {
	ctx := context.Background()
	var h Hypervisor = None{}
	vm := "0e2e0e2e-0000-4000-8000-000000000001"
	if err := h.DefineSecret(ctx, vm, []byte("x")); !errors.Is(err, ErrNoHypervisor) || !errors.Is(err, ErrMigrationFailed) {
		t.Errorf("DefineSecret: %v", err)
	}
	if err := h.Migrate(ctx, vm, Target{Name: "host-b"}); !errors.Is(err, ErrNoHypervisor) {
		t.Errorf("Migrate: %v", err)
	}
	if d, err := h.Domain(ctx, vm); err != nil || d.State != StateAbsent {
		t.Errorf("Domain: %+v %v", d, err)
	}
	if has, err := h.HasSecret(ctx, vm); has || err != nil || h.UndefineSecret(ctx, vm) != nil {
		t.Errorf("secrets: %v %v", has, err)
	}
	if err := Close(h); err != nil {
		t.Errorf("Close: %v", err)
	}
}
