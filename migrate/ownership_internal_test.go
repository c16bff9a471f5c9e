package migrate

import (
	"errors"
	"fmt"
	"testing"

	"github.com/vtpmm/vtpmm/internal/errclass"
	"github.com/vtpmm/vtpmm/migrate/registry"
)

// TestDecideStart is the start rule's table (docs/registry.md, "A restore
// older than the hosts"), host-a holding generation 5.
func TestDecideStart(t *testing.T) {
	rec := func(owner string, gen uint64) *registry.VM {
		return &registry.VM{V: 1, ID: "vm", Owner: owner, Generation: gen}
	}
	for _, tc := range []struct {
		name  string
		r     *registry.VM
		stale bool
		want  startAction
	}{
		{"agree", rec("host-a", 5), false, startAllow},
		{"agree by the last view", rec("host-a", 5), true, startAllow},
		{"no record", nil, false, startRaise},
		{"older record, another owner", rec("host-b", 4), false, startRaise},
		{"older record, this owner", rec("host-a", 3), false, startRaise},
		{"newer elsewhere: stale copy", rec("host-b", 6), false, startStale},
		{"newer here: pending promotion", rec("host-a", 6), false, startPending},
		{"same generation elsewhere", rec("host-b", 5), false, startConflict},
		{"last view without a record", nil, true, startUnknown},
		{"last view older", rec("host-a", 4), true, startUnknown},
		{"last view newer elsewhere", rec("host-b", 6), true, startUnknown},
	} {
		if got := decideStart("host-a", 5, tc.r, tc.stale); got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.want)
		}
	}
}

// TestRegistryErrorClasses: registry errors get migrate's classes (and so
// the admin API's codes and vtpmctl's exit codes) and keep their own.
func TestRegistryErrorClasses(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want []error
		exit int
	}{
		{registry.ErrNoQuorum, []error{ErrRegistryUnavailable}, 6},
		{registry.ErrTLS, []error{ErrRegistryUnavailable}, 6},
		{registry.ErrHostFenced, []error{ErrRegistryRefused}, 2},
		{registry.ErrHostNotActive, []error{ErrRegistryRefused}, 2},
		{registry.ErrNotEnrolled, []error{ErrRegistryRefused}, 2},
		{registry.ErrWrongOwner, []error{ErrRegistryRefused, ErrNotOwner}, 2},
		{registry.ErrBusy, []error{ErrBusy}, 5},
		{errors.Join(registry.ErrBusy, registry.ErrHostFenced), []error{ErrRegistryRefused, ErrBusy}, 2},
		{errors.Join(registry.ErrStaleGeneration, registry.ErrHostFenced), []error{ErrRegistryRefused, ErrNotOwner}, 2},
	} {
		err := registryError(fmt.Errorf("registry: begin: %w", tc.err))
		for _, w := range append(tc.want, tc.err) {
			if !errors.Is(err, w) {
				t.Errorf("%v: not %v", err, w)
			}
		}
		if got := errclass.ExitCode(err); got != tc.exit {
			t.Errorf("%v: exit %d, want %d", err, got, tc.exit)
		}
	}
}
