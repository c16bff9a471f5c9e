package libvirt

import (
	"context"
	"errors"
	"strings"
	"testing"

	golibvirt "libvirt.org/go/libvirt"

	"github.com/vtpmm/vtpmm/hypervisor"
)

// TestDefineDomainXML (libvirt's test driver): a standby defines a VM's
// domain from its owner's description only when the description is that
// VM's and its vTPM is vtpmm's, never over a defined domain; the owner's
// MigratableDomainXML of the defined domain defines it again elsewhere.
func TestDefineDomainXML(t *testing.T) {
	ctx := context.Background()
	h, err := New(ctx, Config{URI: "test:///default", Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	vm, other := "0e2e0e2e-0000-4000-8000-0000000000d1", "0e2e0e2e-0000-4000-8000-0000000000d2"
	doc, err := VMSpec{Name: "described", UUID: vm, TCG: true}.DomainXML()
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := withSecret(doc, "5ec2e7a0-0000-4000-8000-0000000000f1")
	if err != nil {
		t.Fatal(err)
	}
	noTPM := doc[:strings.Index(doc, "<tpm")] + doc[strings.Index(doc, "</tpm>")+len("</tpm>"):]
	for _, tc := range []struct {
		name, vm, doc string
		want          error
	}{
		{"another VM's description", other, doc, ErrBadConfig},
		{"not XML", vm, "<domain", ErrBadConfig},
		{"no vTPM", vm, noTPM, ErrNoVTPM},
		{"another secret", vm, foreign, ErrNoVTPM},
	} {
		if err := h.DefineDomainXML(ctx, tc.vm, tc.doc); !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}
	if d, err := h.Domain(ctx, vm); err != nil || d.State != hypervisor.StateAbsent {
		t.Fatalf("after the refusals: %+v %v, want absent", d, err)
	}
	if err := h.DefineDomainXML(ctx, vm, doc); err != nil {
		t.Fatal(err)
	}
	// The test driver knows no VIR_DOMAIN_UNDEFINE_KEEP_TPM (UndefineDomain's flags).
	undefine := func() error {
		return h.domainOp(ctx, "undefine", vm, func(d *golibvirt.Domain) error { return d.Undefine() })
	}
	defer func() { _ = undefine() }()
	if d, err := h.Domain(ctx, vm); err != nil || d.State != hypervisor.StateShutoff || d.Name != "described" {
		t.Fatalf("defined: %+v %v, want shut off", d, err)
	}
	if err := h.DefineDomainXML(ctx, vm, doc); !errors.Is(err, hypervisor.ErrAlreadyExists) {
		t.Fatalf("define over a defined domain: %v, want ErrAlreadyExists", err)
	}
	desc, err := h.MigratableDomainXML(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	if tpm, err := emulatorTPM(desc); err != nil || tpm == nil || tpm.Encryption == nil || tpm.Encryption.Secret != hypervisor.SecretUUID(vm) {
		t.Fatalf("description's vTPM: %+v %v\n%s", tpm, err, desc)
	}
	if err := undefine(); err != nil {
		t.Fatal(err)
	}
	if err := h.DefineDomainXML(ctx, vm, desc); err != nil {
		t.Fatalf("define from the description: %v\n%s", err, desc)
	}
}
