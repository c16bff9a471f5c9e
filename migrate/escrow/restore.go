package escrow

import (
	"context"
	"fmt"
	"math"

	"github.com/vtpmm/vtpmm/vtpm"
)

// The pure part of a restore. The integration (vtpmctl restore, the
// registry, the destination's vtpmd) supplies the registry's view and the
// destination's attested migration key; this file decides whether a
// restore may happen and at which generation, and hands the key to the
// function that wraps it for the destination, exactly once.

// OwnerStatus is the registry's state of the VM's current owner.
type OwnerStatus string

// Owner states, as the registry reports them.
const (
	OwnerNone        OwnerStatus = "none"        // no owner recorded
	OwnerLive        OwnerStatus = "live"        // lease held, serving
	OwnerDraining    OwnerStatus = "draining"    // moving its VMs away
	OwnerDrained     OwnerStatus = "drained"     // drained: runs no VM
	OwnerUnreachable OwnerStatus = "unreachable" // lease expired, not fenced
	OwnerFenced      OwnerStatus = "fenced"      // fenced or retired: never trusted again
)

// RegistryView is what the registry knows about the VM.
type RegistryView struct {
	Owner      string      // the host that owns the VM's vTPM ("" with OwnerNone)
	Status     OwnerStatus // that host's state
	Generation uint64      // the highest generation the registry has seen for the VM
}

// RestoreOptions are the operator's overrides.
type RestoreOptions struct {
	// Force allows a restore while the owner is drained or unreachable, or
	// onto the owner itself (after its TPM was replaced).
	Force bool
	// AllowOlder allows a bundle whose generation is below the registry's:
	// the VM's state rolls back to the bundle's.
	AllowOlder bool
}

// RestorePlan is a decided restore: which bundle, which VM, where, and
// the new generation, above every one the registry and the bundle know.
type RestorePlan struct {
	BundleID       string
	VM             VM
	Dest           string
	FromGeneration uint64 // the bundle's
	Generation     uint64 // the restored copy's
}

// PlanRestore decides a restore of the bundle with header h onto dest.
// Refusals: ErrStaleBundle (a newer generation exists: a later migration
// or restore; AllowOlder overrides), ErrOwnerActive (the owner is live or
// draining, or drained/unreachable/dest itself without Force). The new
// generation fences every older copy once the registry commits it.
func PlanRestore(h *Header, dest string, view RegistryView, opts RestoreOptions) (RestorePlan, error) {
	if h == nil || !hostIDRE.MatchString(dest) {
		return RestorePlan{}, fmt.Errorf("plan restore: %w: destination host %q", ErrBadRequest, dest)
	}
	vm := h.VM.UUID
	if h.Generation < view.Generation && !opts.AllowOlder {
		return RestorePlan{}, fmt.Errorf("plan restore of %s: %w: the bundle is generation %d, the registry has seen generation %d (a migration or a restore happened after this backup); restore a newer bundle, or allow the rollback explicitly",
			vm, ErrStaleBundle, h.Generation, view.Generation)
	}
	switch {
	case view.Status == OwnerNone || view.Status == "" || view.Status == OwnerFenced:
	case view.Owner == dest:
		if !opts.Force {
			return RestorePlan{}, fmt.Errorf("plan restore of %s: %w: %s is its current owner (%s); restoring onto it replaces its vTPM state: force it only after that host's TPM was replaced",
				vm, ErrOwnerActive, dest, view.Status)
		}
	case view.Status == OwnerLive || view.Status == OwnerDraining:
		return RestorePlan{}, fmt.Errorf("plan restore of %s: %w: its owner %s is %s; drain it or fence it first (for a dead host: vtpmctl host retire %s)",
			vm, ErrOwnerActive, view.Owner, view.Status, view.Owner)
	case view.Status == OwnerDrained || view.Status == OwnerUnreachable:
		if !opts.Force {
			return RestorePlan{}, fmt.Errorf("plan restore of %s: %w: its owner %s is %s; force the restore (the new generation fences its copy) or fence it first",
				vm, ErrOwnerActive, view.Owner, view.Status)
		}
	default:
		return RestorePlan{}, fmt.Errorf("plan restore of %s: %w: unknown owner status %q", vm, ErrBadRequest, view.Status)
	}
	top := max(view.Generation, h.Generation)
	if top == math.MaxUint64 {
		return RestorePlan{}, fmt.Errorf("plan restore of %s: %w: generation overflow", vm, ErrBadRequest)
	}
	return RestorePlan{BundleID: h.ID, VM: h.VM, Dest: dest, FromGeneration: h.Generation, Generation: top + 1}, nil
}

// Release is what the key is handed over with.
type Release struct {
	Plan        RestorePlan
	State       []byte // the vTPM state blob (encrypted under the VM key)
	StateSHA256 string
}

// ReleaseFunc wraps the key for the attested destination and sends it
// with the state, exactly as a migration does (see docs/escrow.md). It
// must not keep the key: it is destroyed when the function returns.
type ReleaseFunc func(ctx context.Context, r Release, key vtpm.VMKey) error

// Release hands the VM key to fn for the planned restore, once: the key is
// destroyed when fn returns, whatever it returns, and a second Release
// fails with ErrKeyUsed. A plan made for another bundle is refused.
func (o *Opened) Release(ctx context.Context, plan RestorePlan, fn ReleaseFunc) error {
	switch {
	case plan.BundleID != o.Header.ID || plan.VM != o.Header.VM || plan.FromGeneration != o.Header.Generation:
		return fmt.Errorf("release: %w: the plan is for bundle %s of VM %s, this is bundle %s of VM %s", ErrBadRequest, plan.BundleID, plan.VM.UUID, o.Header.ID, o.Header.VM.UUID)
	case plan.Generation <= plan.FromGeneration:
		return fmt.Errorf("release: %w: new generation %d is not above the bundle's %d", ErrBadRequest, plan.Generation, plan.FromGeneration)
	case !o.key.Valid() || o.released:
		return fmt.Errorf("release %s: %w", o.Header.VM.UUID, ErrKeyUsed)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	o.released = true
	defer o.key.Destroy()
	if err := fn(ctx, Release{Plan: plan, State: o.State, StateSHA256: o.Header.State.SHA256}, o.key); err != nil {
		return fmt.Errorf("release %s to %s: %w", plan.VM.UUID, plan.Dest, err)
	}
	return nil
}
