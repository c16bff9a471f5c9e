package escrow

import (
	"context"
	"errors"
	"math"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/vtpm"
)

func TestPlanRestore(t *testing.T) {
	h := &Header{ID: "00112233445566778899aabbccddeeff", VM: VM{UUID: testVM, Name: "vm42"}, Generation: 7}
	for _, c := range []struct {
		name    string
		h       *Header
		dest    string
		view    RegistryView
		opts    RestoreOptions
		gen     uint64
		err     error
		message string
	}{
		{"no owner", h, "host-b", RegistryView{Status: OwnerNone}, RestoreOptions{}, 8, nil, ""},
		{"fenced owner, registry ahead of nothing", h, "host-b", RegistryView{Owner: "host-a", Status: OwnerFenced, Generation: 7}, RestoreOptions{}, 8, nil, ""},
		{"older bundle refused", h, "host-b", RegistryView{Owner: "host-a", Status: OwnerFenced, Generation: 9}, RestoreOptions{}, 0, ErrStaleBundle, "the registry has seen generation 9"},
		{"older bundle allowed", h, "host-b", RegistryView{Owner: "host-a", Status: OwnerFenced, Generation: 9}, RestoreOptions{AllowOlder: true}, 10, nil, ""},
		{"live owner", h, "host-b", RegistryView{Owner: "host-a", Status: OwnerLive, Generation: 7}, RestoreOptions{Force: true}, 0, ErrOwnerActive, "its owner host-a is live; drain it or fence it first"},
		{"draining owner", h, "host-b", RegistryView{Owner: "host-a", Status: OwnerDraining, Generation: 7}, RestoreOptions{Force: true}, 0, ErrOwnerActive, "draining"},
		{"unreachable owner", h, "host-b", RegistryView{Owner: "host-a", Status: OwnerUnreachable, Generation: 7}, RestoreOptions{}, 0, ErrOwnerActive, "force the restore"},
		{"unreachable owner, forced", h, "host-b", RegistryView{Owner: "host-a", Status: OwnerUnreachable, Generation: 7}, RestoreOptions{Force: true}, 8, nil, ""},
		{"drained owner, forced", h, "host-b", RegistryView{Owner: "host-a", Status: OwnerDrained, Generation: 7}, RestoreOptions{Force: true}, 8, nil, ""},
		{"onto the owner (new TPM)", h, "host-a", RegistryView{Owner: "host-a", Status: OwnerLive, Generation: 7}, RestoreOptions{}, 0, ErrOwnerActive, "is its current owner"},
		{"onto the owner, forced", h, "host-a", RegistryView{Owner: "host-a", Status: OwnerLive, Generation: 7}, RestoreOptions{Force: true}, 8, nil, ""},
		{"bad destination", h, "host b", RegistryView{}, RestoreOptions{}, 0, ErrBadRequest, "destination"},
		{"unknown status", h, "host-b", RegistryView{Owner: "host-a", Status: "zombie"}, RestoreOptions{}, 0, ErrBadRequest, "zombie"},
		{"overflow", &Header{ID: h.ID, VM: h.VM, Generation: math.MaxUint64}, "host-b", RegistryView{}, RestoreOptions{}, 0, ErrBadRequest, "overflow"},
	} {
		plan, err := PlanRestore(c.h, c.dest, c.view, c.opts)
		if c.err != nil {
			if !errors.Is(err, c.err) || !strings.Contains(err.Error(), c.message) {
				t.Errorf("%s: %v, want %v (%q)", c.name, err, c.err, c.message)
			}
			continue
		}
		if err != nil || plan.Generation != c.gen || plan.Dest != c.dest || plan.VM != h.VM || plan.FromGeneration != c.h.Generation {
			t.Errorf("%s: %+v %v", c.name, plan, err)
		}
	}
}

func TestReleaseOnce(t *testing.T) {
	cs := newCustodians(t, 3, false)
	key, _ := knownKey(t)
	b := seal(t, policyFor(t, 2, cs), testContents(testState(64)), key)
	o, err := Open(context.Background(), b, testVM, identitiesOf(t, cs[0], cs[2]), OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	plan, err := PlanRestore(&o.Header, "host-b", RegistryView{Owner: "host-a", Status: OwnerFenced, Generation: 7}, RestoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	other := plan
	other.BundleID = "ffffffffffffffffffffffffffffffff"
	if err := o.Release(context.Background(), other, nil); !errors.Is(err, ErrBadRequest) {
		t.Fatalf("plan of another bundle: %v", err)
	}
	var held vtpm.VMKey
	err = o.Release(context.Background(), plan, func(_ context.Context, r Release, k vtpm.VMKey) error {
		if !k.Equal(key) || r.Plan.Generation != 8 || len(r.State) != 64 || r.StateSHA256 != o.Header.State.SHA256 {
			t.Errorf("release got %+v", r.Plan)
		}
		held = k
		return errors.New("destination unreachable")
	})
	if err == nil || !strings.Contains(err.Error(), "destination unreachable") {
		t.Fatalf("release error: %v", err)
	}
	if held.Equal(key) || o.Key().Equal(key) {
		t.Fatal("the key was not destroyed after release")
	}
	if err := o.Release(context.Background(), plan, func(context.Context, Release, vtpm.VMKey) error { return nil }); !errors.Is(err, ErrKeyUsed) {
		t.Fatalf("second release: %v", err)
	}
}
