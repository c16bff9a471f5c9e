package evacuate_test

import (
	"cmp"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/evacuate"
)

func host(name string, free uint64) evacuate.Candidate {
	return evacuate.Candidate{Host: evacuate.Host{Name: name, State: evacuate.HostActive, Live: true, Enrolled: true}, Free: free}
}

func vms(mem ...uint64) []evacuate.VM {
	out := make([]evacuate.VM, len(mem))
	for i, m := range mem {
		out[i] = evacuate.VM{ID: vmID(i), Name: fmt.Sprintf("vm%d", i), Memory: m, Running: true}
	}
	return out
}

func equalVMs(n int, mem uint64) []evacuate.VM {
	m := make([]uint64, n)
	for i := range m {
		m[i] = mem
	}
	return vms(m...)
}

// perHost counts the VMs planned per destination.
func perHost(p evacuate.Plan) map[string]int {
	out := map[string]int{}
	for _, a := range p.Assignments {
		out[a.Dest]++
	}
	return out
}

func TestPlan(t *testing.T) {
	with := func(c evacuate.Candidate, f func(*evacuate.Candidate)) evacuate.Candidate { f(&c); return c }
	tests := []struct {
		name string
		in   evacuate.Input
		// want: VMs per host; reasons: why hosts are left out; unplaced: VM
		// index -> reason.
		want     map[string]int
		reasons  map[string]evacuate.Reason
		unplaced map[int]evacuate.Reason
	}{
		{
			name: "equal VMs on equal hosts are dealt round-robin",
			in:   evacuate.Input{VMs: equalVMs(100, GiB), Hosts: []evacuate.Candidate{host("b", 40*GiB), host("c", 40*GiB), host("d", 40*GiB), host("e", 40*GiB)}},
			want: map[string]int{"b": 25, "c": 25, "d": 25, "e": 25},
		},
		{
			name: "most room first: the room left is equalised (6 GiB each)",
			in:   evacuate.Input{VMs: equalVMs(12, GiB), Hosts: []evacuate.Candidate{host("b", 8*GiB), host("c", 16*GiB)}},
			want: map[string]int{"b": 2, "c": 10},
		},
		{
			name: "largest first, so the big VM finds the one host it fits",
			in:   evacuate.Input{VMs: vms(GiB, GiB, GiB, 6*GiB), Hosts: []evacuate.Candidate{host("b", 7*GiB), host("c", 4*GiB)}},
			want: map[string]int{"b": 1, "c": 3}, // 6 GiB on b first, then the small ones where room is left
		},
		{
			name: "headroom is kept free",
			in: evacuate.Input{VMs: equalVMs(4, GiB), Headroom: 2 * GiB,
				Hosts: []evacuate.Candidate{host("b", 4*GiB), host("c", 2*GiB)}},
			want:     map[string]int{"b": 2},
			reasons:  map[string]evacuate.Reason{"c": evacuate.ReasonNoRoom},
			unplaced: map[int]evacuate.Reason{2: evacuate.ReasonNoRoom, 3: evacuate.ReasonNoRoom},
		},
		{
			name: "every reason a host is left out",
			in: evacuate.Input{VMs: equalVMs(2, GiB), To: []string{"b", "c", "d", "e", "f", "g", "h", "i", "j"},
				Excluded: map[string]evacuate.Exclusion{
					"h": {Reason: evacuate.ReasonRefused, Rule: "pcr-policy", Detail: "PCR 7 differs"},
					"i": {Reason: evacuate.ReasonFailed, Detail: "unreachable"}},
				Hosts: []evacuate.Candidate{
					host("a", 64*GiB), // the source
					host("b", 64*GiB),
					with(host("c", 64*GiB), func(c *evacuate.Candidate) { c.State = evacuate.HostFenced }),
					with(host("d", 64*GiB), func(c *evacuate.Candidate) { c.State = evacuate.HostDraining }),
					with(host("e", 64*GiB), func(c *evacuate.Candidate) { c.Live = false }),
					with(host("f", 64*GiB), func(c *evacuate.Candidate) { c.FreeErr = "connection refused" }),
					with(host("g", 64*GiB), func(c *evacuate.Candidate) { c.Enrolled = false }),
					host("h", 64*GiB),
					host("i", 64*GiB),
					host("j", 512<<20),
					host("k", 64*GiB), // not in --to
				}},
			want: map[string]int{"b": 2},
			reasons: map[string]evacuate.Reason{"c": evacuate.ReasonFenced, "d": evacuate.ReasonDraining, "e": evacuate.ReasonNotLive,
				"f": evacuate.ReasonNotLive, "g": evacuate.ReasonNotEnrolled, "h": evacuate.ReasonRefused, "i": evacuate.ReasonFailed,
				"j": evacuate.ReasonNoRoom, "k": evacuate.ReasonNotInTo},
		},
		{
			name:     "no eligible host at all",
			in:       evacuate.Input{VMs: equalVMs(2, GiB), Hosts: []evacuate.Candidate{with(host("b", 64*GiB), func(c *evacuate.Candidate) { c.State = evacuate.HostDraining })}},
			want:     map[string]int{},
			reasons:  map[string]evacuate.Reason{"b": evacuate.ReasonDraining},
			unplaced: map[int]evacuate.Reason{0: evacuate.ReasonNoDestination, 1: evacuate.ReasonNoDestination},
		},
		{
			name: "a VM bigger than any room is unplaced, the others still go",
			in:   evacuate.Input{VMs: vms(GiB, 32*GiB, GiB), Hosts: []evacuate.Candidate{host("b", 8*GiB), host("c", 8*GiB)}},
			want: map[string]int{"b": 1, "c": 1}, unplaced: map[int]evacuate.Reason{1: evacuate.ReasonNoRoom},
		},
		{
			name: "prior assignments are kept while they fit",
			in: evacuate.Input{VMs: equalVMs(4, GiB), Hosts: []evacuate.Candidate{host("b", 40*GiB), host("c", 40*GiB)},
				Prior: map[string]string{vmID(0): "c", vmID(1): "c", vmID(2): "c", vmID(3): "c"}},
			want: map[string]int{"c": 4},
		},
		{
			name: "prior assignments to a host left out are re-planned",
			in: evacuate.Input{VMs: equalVMs(4, GiB), Hosts: []evacuate.Candidate{host("b", 40*GiB), host("c", 40*GiB), host("d", 40*GiB)},
				Excluded: map[string]evacuate.Exclusion{"c": {Reason: evacuate.ReasonRefused, Rule: "ek-chain", Detail: "EK certificate does not chain"}},
				Prior:    map[string]string{vmID(0): "c", vmID(1): "c", vmID(2): "b", vmID(3): "b"}},
			want:    map[string]int{"b": 2, "d": 2},
			reasons: map[string]evacuate.Reason{"c": evacuate.ReasonRefused},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.in.Source = "a"
			p, err := evacuate.MakePlan(tc.in)
			if err != nil {
				t.Fatal(err)
			}
			if got := perHost(p); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("VMs per host %v, want %v", got, tc.want)
			}
			for _, h := range p.Hosts {
				if h.Host == "a" {
					t.Error("the source is listed as a destination")
				}
				if want := tc.reasons[h.Host]; h.Reason != want || h.Eligible != (want == "") {
					t.Errorf("%s: reason %q eligible %v, want %q", h.Host, h.Reason, h.Eligible, want)
				}
				if !h.Eligible && h.Detail == "" {
					t.Errorf("%s left out without a detail", h.Host)
				}
				if h.Host == "h" && h.Rule != "pcr-policy" {
					t.Errorf("refused host's rule %q", h.Rule)
				}
				if h.Assigned > h.Room {
					t.Errorf("%s: %d bytes planned, room %d", h.Host, h.Assigned, h.Room)
				}
			}
			got := map[int]evacuate.Reason{}
			for _, u := range p.Unplaced {
				i := slices.IndexFunc(tc.in.VMs, func(v evacuate.VM) bool { return v.ID == u.VM })
				got[i] = u.Reason
			}
			if len(got) > 0 || len(tc.unplaced) > 0 {
				if !reflect.DeepEqual(got, tc.unplaced) {
					t.Errorf("unplaced %v, want %v", got, tc.unplaced)
				}
			}
			if len(p.Assignments)+len(p.Unplaced) != len(tc.in.VMs) {
				t.Errorf("%d placed + %d unplaced of %d VMs", len(p.Assignments), len(p.Unplaced), len(tc.in.VMs))
			}
		})
	}
}

// TestPlanDeterministic: the same input in any order gives the same plan.
func TestPlanDeterministic(t *testing.T) {
	in := evacuate.Input{Source: "a", Headroom: 512 << 20}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 200 {
		in.VMs = append(in.VMs, evacuate.VM{ID: vmID(i), Memory: uint64(1+rng.IntN(8)) * GiB, Running: true})
	}
	for _, n := range []string{"b", "c", "d", "e", "f"} {
		in.Hosts = append(in.Hosts, host(n, uint64(100+rng.IntN(200))*GiB))
	}
	want, err := evacuate.MakePlan(in)
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		rng.Shuffle(len(in.VMs), func(i, j int) { in.VMs[i], in.VMs[j] = in.VMs[j], in.VMs[i] })
		rng.Shuffle(len(in.Hosts), func(i, j int) { in.Hosts[i], in.Hosts[j] = in.Hosts[j], in.Hosts[i] })
		got, err := evacuate.MakePlan(in)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatal("the plan depends on the order of its input")
		}
	}
	if !slices.IsSortedFunc(want.Assignments, func(a, b evacuate.Assignment) int { return cmp.Compare(a.VM, b.VM) }) {
		t.Error("assignments not sorted by VM")
	}
	// Worst fit keeps the room left within one largest VM across hosts.
	var lo, hi uint64 = ^uint64(0), 0
	for _, h := range want.Hosts {
		left := h.Room - h.Assigned
		lo, hi = min(lo, left), max(hi, left)
	}
	if hi-lo > 8*GiB {
		t.Errorf("room left ranges from %d to %d GiB: not balanced", lo/GiB, hi/GiB)
	}
}

func TestPlanInputErrors(t *testing.T) {
	hosts := []evacuate.Candidate{host("a", GiB), host("b", GiB)}
	tests := []struct {
		name string
		in   evacuate.Input
		want error
	}{
		{"no source", evacuate.Input{Hosts: hosts}, evacuate.ErrBadInput},
		{"repeated VM", evacuate.Input{Source: "a", Hosts: hosts, VMs: append(vms(1), vms(1)...)}, evacuate.ErrBadInput},
		{"repeated host", evacuate.Input{Source: "a", Hosts: append(hosts, host("b", 1))}, evacuate.ErrBadInput},
		{"--to the source", evacuate.Input{Source: "a", Hosts: hosts, To: []string{"a"}}, evacuate.ErrBadInput},
		{"--to unknown", evacuate.Input{Source: "a", Hosts: hosts, To: []string{"z"}}, evacuate.ErrUnknownHost},
	}
	for _, tc := range tests {
		if _, err := evacuate.MakePlan(tc.in); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
}

func TestBatches(t *testing.T) {
	p, err := evacuate.MakePlan(evacuate.Input{Source: "a", VMs: equalVMs(10, GiB), Hosts: []evacuate.Candidate{host("c", 40*GiB), host("b", 40*GiB)}})
	if err != nil {
		t.Fatal(err)
	}
	bs := p.Batches()
	if len(bs) != 2 || bs[0].Dest != "b" || bs[1].Dest != "c" || len(bs[0].VMs)+len(bs[1].VMs) != 10 {
		t.Fatalf("batches %+v", bs)
	}
	for _, b := range bs {
		for _, a := range b.VMs {
			if d, ok := p.Dest(a.VM); !ok || d != b.Dest {
				t.Errorf("Dest(%s) = %q %v", a.VM, d, ok)
			}
		}
	}
}

// BenchmarkPlan: the pure planner, 4 destinations (and 16 for 1000 VMs
// would be the same order: O(VMs log hosts)).
func BenchmarkPlan10(b *testing.B)   { benchPlan(b, 10, 4) }
func BenchmarkPlan100(b *testing.B)  { benchPlan(b, 100, 4) }
func BenchmarkPlan400(b *testing.B)  { benchPlan(b, 400, 4) }
func BenchmarkPlan1000(b *testing.B) { benchPlan(b, 1000, 4) }

func benchPlan(b *testing.B, n, hosts int) {
	rng := rand.New(rand.NewPCG(3, 4))
	in := evacuate.Input{Source: "a", Headroom: 512 << 20}
	for i := range n {
		in.VMs = append(in.VMs, evacuate.VM{ID: vmID(i), Memory: uint64(1+rng.IntN(8)) * GiB, Running: true})
	}
	for i := range hosts {
		in.Hosts = append(in.Hosts, host(fmt.Sprintf("h%02d", i), uint64(n)*4*GiB))
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := evacuate.MakePlan(in); err != nil {
			b.Fatal(err)
		}
	}
}
