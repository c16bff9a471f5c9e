package migrate_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
)

// liveAs is the real registry client with the liveness of some hosts set
// by the test (the harness's hosts hold no leases).
type liveAs struct {
	*registry.Client
	live map[string]bool
}

func (l liveAs) Hosts(ctx context.Context, names ...string) (registry.HostsView, error) {
	v, err := l.Client.Hosts(ctx, names...)
	for h, live := range l.live {
		hv := v.Hosts[h]
		hv.Name, hv.Live = h, live
		if v.Hosts == nil {
			v.Hosts = map[string]registry.HostView{}
		}
		v.Hosts[h] = hv
	}
	return v, err
}

// TestFencedStartRule: the start rule of an owner fenced for its VM's
// record (F11, the VM stuck behind a per-host fence): it takes the VM back
// (Reassert) when its fencer is gone, or live with no current replica of
// the VM (its standby record absent or at another generation); it waits
// (rule fenced) only while a live fencer holds a current replica, which
// that fencer promotes. The fencer sees the VMs it must promote
// (FencedHere) until the owner took the VM back.
func TestFencedStartRule(t *testing.T) {
	ctx := context.Background()
	f := newFleet(t)
	f.useRegistry("etcd")
	b, c := f.addHost("host-b", goodLog), f.addHost("host-c", goodLog)
	live := map[string]bool{}
	b.reg = liveAs{Client: f.regs["host-b"].(*registry.Client), live: live}
	b.restart()
	op := f.op.(*registry.Client)
	cases := []struct {
		name       string
		fencerLive bool
		standby    int64 // host-c's standby record: -1 none, else its generation
		wantStart  bool
	}{
		{"fencer live, no replica", true, -1, true},
		{"fencer live, replica assigned but never sent", true, 0, true},
		{"fencer live, replica current", true, 1, false},
		{"fencer gone, replica current", false, 1, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			vm := b.createVM("fenced")
			if tc.standby >= 0 {
				if err := op.AssignStandby(ctx, vm, "host-c"); err != nil {
					t.Fatal(err)
				}
				if tc.standby > 0 {
					if err := op.RefreshStandby(ctx, registry.Standby{VM: vm, Host: "host-c", Generation: uint64(tc.standby)}); err != nil {
						t.Fatal(err)
					}
				}
			}
			// host-c fences host-b (for another VM: the record is per host).
			frev, err := op.PutFence(ctx, "host-b", "host-c")
			if err != nil {
				t.Fatal(err)
			}
			live["host-c"] = tc.fencerLive
			here, _, err := c.node.FencedHere(ctx, vm)
			if err != nil || !here {
				t.Fatalf("host-c's FencedHere: %v %v, want true (it fenced the owner for the record)", here, err)
			}
			_, err = b.node.CheckStart(ctx, vm)
			rec, rev, rerr := op.VMRev(ctx, vm)
			if rerr != nil {
				t.Fatal(rerr)
			}
			if !tc.wantStart {
				if !errors.Is(err, migrate.ErrNotOwner) || !strings.Contains(err.Error(), "rule "+migrate.RuleFenced) {
					t.Fatalf("start: %v, want a refusal naming rule %s", err, migrate.RuleFenced)
				}
				if rev > frev {
					t.Fatalf("the record moved past the fence (%d > %d) although the fencer may promote", rev, frev)
				}
				return
			}
			if err != nil {
				t.Fatalf("start: %v, want the owner to take the VM back", err)
			}
			if rec.Owner != "host-b" || rec.Generation != 1 || rev <= frev {
				t.Fatalf("after the take-back: %+v at revision %d, fence at %d", rec, rev, frev)
			}
			// The take-back ends the fence for this record: the fencer no
			// longer promotes it.
			if here, _, err := c.node.FencedHere(ctx, vm); err != nil || here {
				t.Fatalf("host-c's FencedHere after the take-back: %v %v, want false", here, err)
			}
		})
	}
	// A fence by another host does not make host-c promote.
	vm := b.createVM("fenced-by-a")
	if _, err := op.PutFence(ctx, "host-b", "host-a"); err != nil {
		t.Fatal(err)
	}
	if here, _, err := c.node.FencedHere(ctx, vm); err != nil || here {
		t.Fatalf("FencedHere of a fence by host-a on host-c: %v %v, want false", here, err)
	}
}

// TestStartWaitsForRegistration (TestSoakFailover in CI, the VM on two
// hosts): a host whose vtpmd came back between a standby's fence agent and
// its fence record must not start the VM before its liveness key is in
// the registry, or the standby, checking liveness after its record, does
// not see it back and promotes while it runs the VM. The start rule asks
// Config.Registered before it reads the fence record, and refuses (rule
// self-fence) while the host is not registered.
func TestStartWaitsForRegistration(t *testing.T) {
	ctx := context.Background()
	f := newFleet(t)
	f.useRegistry("etcd")
	b := f.addHost("host-b", goodLog)
	vm := b.createVM("back-early")
	var calls int
	notYet := errors.New("not registered yet")
	b.registered = func(context.Context) error { calls++; return notYet }
	b.restart()
	_, err := b.node.CheckStart(ctx, vm)
	if !errors.Is(err, migrate.ErrNotOwner) || !errors.Is(err, notYet) || !strings.Contains(err.Error(), "rule "+migrate.RuleSelfFence) || calls != 1 {
		t.Fatalf("start before the registration: %v (%d calls), want a refusal naming rule %s", err, calls, migrate.RuleSelfFence)
	}
	b.registered = func(context.Context) error { calls++; return nil }
	b.restart()
	if _, err := b.node.CheckStart(ctx, vm); err != nil || calls != 2 {
		t.Fatalf("start once registered: %v (%d calls)", err, calls)
	}
}
