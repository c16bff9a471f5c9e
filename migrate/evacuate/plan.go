package evacuate

import (
	"cmp"
	"container/heap"
	"fmt"
	"slices"
)

// Reason says why a host is not a destination, or why a VM has none.
type Reason string

// Reasons, in the order the planner checks them.
const (
	ReasonNotInTo     Reason = "not-in-to"    // --to was given and does not name it
	ReasonFenced      Reason = "fenced"       // fenced in the registry
	ReasonDraining    Reason = "draining"     // draining in the registry
	ReasonNotLive     Reason = "not-live"     // no liveness lease, or its hypervisor did not answer
	ReasonNotEnrolled Reason = "not-enrolled" // never enrolled by the operator
	ReasonRefused     Reason = "refused"      // refused by attestation (Rule names the rule)
	ReasonFailed      Reason = "failed"       // failed during this evacuation
	ReasonNoRoom      Reason = "no-room"      // free memory minus headroom below the smallest VM
	// ReasonNoDestination is a VM's: no host is eligible at all.
	ReasonNoDestination Reason = "no-destination"
)

// Candidate is a host the planner may use, with its free memory.
type Candidate struct {
	Host
	Free uint64 // bytes free, as its hypervisor reports it
	// FreeErr, when set, says why its hypervisor could not be asked; the
	// host is then not live for the plan.
	FreeErr string
}

// Exclusion takes a host out of the plan: refused by attestation or failed
// during this evacuation.
type Exclusion struct {
	Reason Reason // ReasonRefused or ReasonFailed
	Rule   string // ReasonRefused: the attestation rule
	Detail string
}

// Input is everything a plan depends on. Plan is a pure function of it.
type Input struct {
	Source   string
	VMs      []VM        // the VMs to place (running on the source)
	Hosts    []Candidate // every host in the registry (the source is skipped)
	To       []string    // when set, only these hosts
	Headroom uint64      // bytes kept free on every destination
	Excluded map[string]Exclusion
	// Prior keeps earlier assignments (a resumed evacuation, or a re-plan
	// after a refusal) while their host is still eligible and has room.
	Prior map[string]string
}

// Assignment places one VM.
type Assignment struct {
	VM     string `json:"vm"`
	Name   string `json:"name"`
	Memory uint64 `json:"memory"`
	Dest   string `json:"dest"`
}

// Unplaced is a VM with no destination.
type Unplaced struct {
	VM     string `json:"vm"`
	Name   string `json:"name"`
	Memory uint64 `json:"memory"`
	Reason Reason `json:"reason"`
	Detail string `json:"detail"`
}

// HostPlan is one host's part in the plan, or why it has none.
type HostPlan struct {
	Host     string `json:"host"`
	Eligible bool   `json:"eligible"`
	Reason   Reason `json:"reason,omitempty"`
	Rule     string `json:"rule,omitempty"`
	Detail   string `json:"detail,omitempty"`
	Free     uint64 `json:"free"`
	Room     uint64 `json:"room"` // free minus headroom
	Assigned uint64 `json:"assigned"`
	VMs      int    `json:"vms"`
}

// Plan is where every VM goes and why every other host is left out.
type Plan struct {
	Source      string       `json:"source"`
	Assignments []Assignment `json:"assignments"` // sorted by VM ID
	Unplaced    []Unplaced   `json:"unplaced"`    // sorted by VM ID
	Hosts       []HostPlan   `json:"hosts"`       // every host but the source, sorted by name
}

// BatchPlan is the VMs planned for one destination.
type BatchPlan struct {
	Dest string
	VMs  []Assignment // sorted by VM ID
}

// Batches groups the plan by destination, sorted by destination.
func (p Plan) Batches() []BatchPlan {
	by := map[string][]Assignment{}
	for _, a := range p.Assignments {
		by[a.Dest] = append(by[a.Dest], a)
	}
	out := make([]BatchPlan, 0, len(by))
	for d, vms := range by {
		out = append(out, BatchPlan{Dest: d, VMs: vms})
	}
	slices.SortFunc(out, func(a, b BatchPlan) int { return cmp.Compare(a.Dest, b.Dest) })
	return out
}

// Dest returns the destination planned for vm.
func (p Plan) Dest(vm string) (string, bool) {
	i, ok := slices.BinarySearchFunc(p.Assignments, vm, func(a Assignment, id string) int { return cmp.Compare(a.VM, id) })
	if !ok {
		return "", false
	}
	return p.Assignments[i].Dest, true
}

// MakePlan places every VM of in on an eligible host: worst fit
// decreasing. VMs are taken largest first (ties by ID), each onto the
// eligible host with the most room left (ties: fewer VMs, then name). So
// every destination keeps about the same free memory, the largest VMs find
// room before small ones fragment it, and equal VMs on equal hosts are
// dealt round-robin (balanced by count). Prior assignments are kept first
// while they fit. The result depends only on in.
func MakePlan(in Input) (Plan, error) {
	if err := checkInput(in); err != nil {
		return Plan{}, err
	}
	vms := slices.Clone(in.VMs)
	slices.SortFunc(vms, func(a, b VM) int {
		if c := cmp.Compare(b.Memory, a.Memory); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
	var smallest uint64
	if len(vms) > 0 {
		smallest = vms[len(vms)-1].Memory
	}
	hosts := slices.Clone(in.Hosts)
	slices.SortFunc(hosts, func(a, b Candidate) int { return cmp.Compare(a.Name, b.Name) })
	to := map[string]bool{}
	for _, h := range in.To {
		to[h] = true
	}

	p := Plan{Source: in.Source, Assignments: make([]Assignment, 0, len(vms)), Unplaced: []Unplaced{}}
	idx := map[string]int{} // eligible host -> index in p.Hosts
	for _, h := range hosts {
		if h.Name == in.Source {
			continue
		}
		hp := HostPlan{Host: h.Name, Free: h.Free}
		if h.Free > in.Headroom {
			hp.Room = h.Free - in.Headroom
		}
		hp.Reason, hp.Rule, hp.Detail = leftOut(h, in, to, hp.Room, smallest)
		hp.Eligible = hp.Reason == ""
		if hp.Eligible {
			idx[h.Name] = len(p.Hosts)
		}
		p.Hosts = append(p.Hosts, hp)
	}
	assign := func(vm VM, i int) {
		p.Hosts[i].Assigned += vm.Memory
		p.Hosts[i].VMs++
		p.Assignments = append(p.Assignments, Assignment{VM: vm.ID, Name: vm.Name, Memory: vm.Memory, Dest: p.Hosts[i].Host})
	}
	left := func(i int) uint64 { return p.Hosts[i].Room - p.Hosts[i].Assigned }

	rest := vms[:0:0]
	for _, vm := range vms {
		if i, ok := idx[in.Prior[vm.ID]]; ok && vm.Memory <= left(i) {
			assign(vm, i)
			continue
		}
		rest = append(rest, vm)
	}
	h := &roomHeap{plan: &p}
	for _, i := range idx {
		h.idx = append(h.idx, i)
	}
	heap.Init(h)
	for _, vm := range rest {
		if h.Len() == 0 {
			p.Unplaced = append(p.Unplaced, Unplaced{VM: vm.ID, Name: vm.Name, Memory: vm.Memory, Reason: ReasonNoDestination,
				Detail: "no host is eligible (see the hosts left out)"})
			continue
		}
		top := h.idx[0]
		if vm.Memory > left(top) {
			p.Unplaced = append(p.Unplaced, Unplaced{VM: vm.ID, Name: vm.Name, Memory: vm.Memory, Reason: ReasonNoRoom,
				Detail: fmt.Sprintf("needs %s; the most room left is %s on %s", bytesIEC(vm.Memory), bytesIEC(left(top)), p.Hosts[top].Host)})
			continue
		}
		assign(vm, top)
		heap.Fix(h, 0)
	}
	slices.SortFunc(p.Assignments, func(a, b Assignment) int { return cmp.Compare(a.VM, b.VM) })
	slices.SortFunc(p.Unplaced, func(a, b Unplaced) int { return cmp.Compare(a.VM, b.VM) })
	return p, nil
}

// leftOut returns why h cannot be a destination ("" when it can).
func leftOut(h Candidate, in Input, to map[string]bool, room, smallest uint64) (Reason, string, string) {
	switch {
	case len(to) > 0 && !to[h.Name]:
		return ReasonNotInTo, "", "not named by --to"
	case h.State == HostFenced:
		return ReasonFenced, "", "fenced in the registry"
	case h.State == HostDraining:
		return ReasonDraining, "", "draining in the registry"
	case h.State != HostActive:
		return ReasonNotLive, "", fmt.Sprintf("unknown state %q in the registry", h.State)
	case !h.Live:
		return ReasonNotLive, "", "no liveness lease in the registry"
	case h.FreeErr != "":
		return ReasonNotLive, "", "its hypervisor did not report free memory: " + h.FreeErr
	case !h.Enrolled:
		return ReasonNotEnrolled, "", "never enrolled (vtpmctl host enroll)"
	}
	if x, ok := in.Excluded[h.Name]; ok {
		return x.Reason, x.Rule, x.Detail
	}
	if room < smallest {
		return ReasonNoRoom, "", fmt.Sprintf("%s free minus %s headroom leaves %s, less than the smallest VM (%s)",
			bytesIEC(h.Free), bytesIEC(in.Headroom), bytesIEC(room), bytesIEC(smallest))
	}
	return "", "", ""
}

func checkInput(in Input) error {
	if in.Source == "" {
		return fmt.Errorf("plan: %w: no source host", ErrBadInput)
	}
	seen := map[string]bool{}
	for _, vm := range in.VMs {
		if vm.ID == "" || seen[vm.ID] {
			return fmt.Errorf("plan: %w: VM id %q empty or repeated", ErrBadInput, vm.ID)
		}
		seen[vm.ID] = true
	}
	known := map[string]bool{}
	for _, h := range in.Hosts {
		if h.Name == "" || known[h.Name] {
			return fmt.Errorf("plan: %w: host %q empty or repeated", ErrBadInput, h.Name)
		}
		known[h.Name] = true
	}
	for _, t := range in.To {
		switch {
		case t == in.Source:
			return fmt.Errorf("plan: %w: --to names the source host %s", ErrBadInput, t)
		case !known[t]:
			return fmt.Errorf("plan: --to %s: %w", t, ErrUnknownHost)
		}
	}
	return nil
}

// roomHeap orders eligible hosts by room left (most first), then fewer
// VMs, then name.
type roomHeap struct {
	plan *Plan
	idx  []int
}

func (h *roomHeap) Len() int { return len(h.idx) }
func (h *roomHeap) Less(a, b int) bool {
	x, y := &h.plan.Hosts[h.idx[a]], &h.plan.Hosts[h.idx[b]]
	lx, ly := x.Room-x.Assigned, y.Room-y.Assigned
	if lx != ly {
		return lx > ly
	}
	if x.VMs != y.VMs {
		return x.VMs < y.VMs
	}
	return x.Host < y.Host
}
func (h *roomHeap) Swap(a, b int) { h.idx[a], h.idx[b] = h.idx[b], h.idx[a] }
func (h *roomHeap) Push(x any)    { h.idx = append(h.idx, x.(int)) }
func (h *roomHeap) Pop() any {
	x := h.idx[len(h.idx)-1]
	h.idx = h.idx[:len(h.idx)-1]
	return x
}

// bytesIEC renders a byte count as 512 MiB, 1.5 GiB, ...
func bytesIEC(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	v := float64(n) / float64(div)
	if v == float64(uint64(v)) {
		return fmt.Sprintf("%d %ciB", uint64(v), "KMGTPE"[exp])
	}
	return fmt.Sprintf("%.1f %ciB", v, "KMGTPE"[exp])
}
