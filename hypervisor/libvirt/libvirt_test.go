package libvirt

import (
	"errors"
	"testing"

	golibvirt "libvirt.org/go/libvirt"

	"github.com/vtpmm/vtpmm/hypervisor"
)

func TestDomainXML(t *testing.T) {
	vm := "0e2e0e2e-0000-4000-8000-000000000001"
	doc, err := VMSpec{Name: "v", UUID: vm, TPMVersion: "1.2", TCG: true}.DomainXML()
	if err != nil {
		t.Fatal(err)
	}
	tpm, err := emulatorTPM(doc)
	if err != nil || tpm == nil || tpm.Version != "1.2" || tpm.Encryption.Secret != hypervisor.SecretUUID(vm) {
		t.Fatalf("tpm %+v, %v in\n%s", tpm, err, doc)
	}
	doc, err = withSecret(doc, "5ec2e7a0-0000-4000-8000-0000000000f1")
	if err != nil {
		t.Fatal(err)
	}
	if tpm, _ := emulatorTPM(doc); tpm.Encryption.Secret != "5ec2e7a0-0000-4000-8000-0000000000f1" {
		t.Fatalf("withSecret: %s", doc)
	}
	if _, err := (VMSpec{Name: "v", UUID: vm, TPMVersion: "3"}).DomainXML(); !errors.Is(err, ErrBadConfig) {
		t.Fatalf("bad TPM version: %v", err)
	}
}

func TestClassifyMigrate(t *testing.T) {
	lv := func(code golibvirt.ErrorNumber, msg string) error { return golibvirt.Error{Code: code, Message: msg} }
	has := func(v bool) func() (bool, bool) { return func() (bool, bool) { return v, true } }
	for _, tc := range []struct {
		err    error
		secret bool
		want   error
	}{
		{lv(golibvirt.ERR_NO_SECRET, "Secret not found: no secret with matching uuid 'x'"), false, hypervisor.ErrSecretMissing},
		{lv(golibvirt.ERR_OPERATION_FAILED, "operation failed: job 'migration out' unexpectedly failed"), true, hypervisor.ErrSecretMismatch},
		{lv(golibvirt.ERR_OPERATION_FAILED, "operation failed: job 'migration out' unexpectedly failed"), false, hypervisor.ErrMigrationFailed},
		{lv(golibvirt.ERR_INTERNAL_ERROR, "internal error: qemu unexpectedly closed the monitor: tpm-emulator: Setting the stateblob (type 1) failed with a TPM error 0x21 decryption error"), false, hypervisor.ErrSecretMismatch},
		{lv(golibvirt.ERR_SYSTEM_ERROR, "unable to connect to server at '10.251.0.9:16509': Connection refused"), false, hypervisor.ErrUnreachable},
		{lv(golibvirt.ERR_OPERATION_FAILED, "operation failed: domain 'v' already exists with uuid x"), false, hypervisor.ErrAlreadyExists},
		{lv(golibvirt.ERR_OPERATION_INVALID, "Requested operation is not valid: domain is not running"), false, hypervisor.ErrNotRunning},
		{lv(golibvirt.ERR_INTERNAL_ERROR, "internal error: Attempt to migrate guest to the same host x"), false, hypervisor.ErrMigrationFailed},
		{hypervisor.ErrNoDomain, false, hypervisor.ErrNoDomain},
	} {
		if got := classifyMigrate(tc.err, has(tc.secret)); !errors.Is(got, tc.want) {
			t.Errorf("classify(%v, secret=%v) = %v, want %v", tc.err, tc.secret, got, tc.want)
		}
	}
}
