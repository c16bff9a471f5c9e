package hypervisor

import (
	"context"
	"fmt"
)

// None is the one representation of "no hypervisor": vtpmd then runs each
// VM's vTPM itself and cannot migrate. It knows no domain and no secret;
// defining a secret or migrating fails with ErrNoHypervisor.
type None struct{}

var _ Hypervisor = None{}

// IsNone reports whether h is None.
func IsNone(h Hypervisor) bool { _, ok := h.(None); return ok }

// Name is "none".
func (None) Name() string { return "none" }

// DefineSecret fails: there is no hypervisor to give the secret to.
func (None) DefineSecret(context.Context, string, []byte) error {
	return fmt.Errorf("define secret: %w", ErrNoHypervisor)
}

// UndefineSecret does nothing (no secret is ever defined).
func (None) UndefineSecret(context.Context, string) error { return nil }

// HasSecret is false.
func (None) HasSecret(context.Context, string) (bool, error) { return false, nil }

// Domain reports every VM absent.
func (None) Domain(_ context.Context, vmUUID string) (Domain, error) {
	return Domain{UUID: vmUUID, State: StateAbsent}, nil
}

// Domains is empty.
func (None) Domains(context.Context) ([]Domain, error) { return nil, nil }

// Migrate fails: nothing can be migrated.
func (None) Migrate(context.Context, string, Target) error {
	return fmt.Errorf("migrate: %w", ErrNoHypervisor)
}
