package soak

import (
	"fmt"
	"sort"
	"strings"
	"time"
)

// History is what a schedule did: every step with its outcome, the
// faults injected by kind, and the invariants violated.
type History struct {
	Seed       uint64
	Registry   string
	Failover   bool     // a failover schedule (Config.Failover)
	First      []string // the ops of the first steps (Config.First)
	Steps      int
	Events     []Event
	Faults     map[string]int
	Violations []Violation
	Settle     time.Duration // the final recovery
	// Linearizable is porcupine's verdict on the registry's records
	// (Ok, Illegal, Unknown: timed out).
	Linearizable string
	Wall         time.Duration
	log          func(string)
}

// Event is one line of the history.
type Event struct {
	Step    int
	Kind    string
	What    string
	Outcome string
	Took    time.Duration
}

func (e Event) String() string {
	took := ""
	if e.Took > 0 {
		took = fmt.Sprintf(" [%v]", e.Took.Round(time.Millisecond))
	}
	return fmt.Sprintf("%3d %-9s %s => %s%s", e.Step, e.Kind, e.What, e.Outcome, took)
}

// Violation is an invariant violated at a step (Steps+1: the end).
type Violation struct {
	Step   int
	Rule   string
	Detail string
}

func (h *History) add(step int, kind, what, out string) { h.addTimed(step, kind, what, out, 0) }

func (h *History) addTimed(step int, kind, what, out string, took time.Duration) {
	e := Event{Step: step, Kind: kind, What: what, Outcome: out, Took: took}
	h.Events = append(h.Events, e)
	if h.log != nil {
		h.log(fmt.Sprintf("seed %d: %s", h.Seed, e))
	}
}

// String is the whole history, for a failing schedule's report.
func (h *History) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "schedule seed %d (registry %s): %d steps, faults %s, %d violations, wall %v\n",
		h.Seed, h.Registry, h.Steps, FaultString(h.Faults), len(h.Violations), h.Wall.Round(time.Millisecond))
	for _, e := range h.Events {
		b.WriteString(e.String() + "\n")
	}
	for _, v := range h.Violations {
		fmt.Fprintf(&b, "VIOLATED at step %d: %s: %s\n", v.Step, v.Rule, v.Detail)
	}
	fo := "off"
	if h.Failover {
		fo = "on"
	}
	first := ""
	if len(h.First) > 0 {
		first = " -soak.first " + strings.Join(h.First, ",")
	}
	fmt.Fprintf(&b, "replay: go test ./test/soak -run 'TestSoak$' -v -soak.seed %d -soak.schedules 1 -soak.steps %d -soak.failover %s%s\n", h.Seed, h.Steps, fo, first)
	return b.String()
}

// FaultString prints faults by kind, sorted.
func FaultString(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%d", k, m[k])
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, " ")
}

// Totals sums schedules for make soak's table.
type Totals struct {
	Schedules, Steps, Errors int
	Faults                   map[string]int
	Violations               map[string]int
	Lin                      map[string]int // porcupine's verdicts
	SetupRetries             int            // fleets that did not start the first time
	Seeds                    []uint64       // of the schedules that failed
	First, Last              uint64         // the seeds run
	Wall, Settle             time.Duration
}

// NewTotals returns empty totals.
func NewTotals() *Totals {
	return &Totals{Faults: map[string]int{}, Violations: map[string]int{}, Lin: map[string]int{}}
}

// Add counts one schedule (err: its Run error).
func (t *Totals) Add(h *History, err error) {
	t.Schedules++
	if h != nil {
		if t.Schedules == 1 {
			t.First = h.Seed
		}
		t.Last = h.Seed
		t.Steps += h.Steps
		t.Settle += h.Settle
		for k, n := range h.Faults {
			t.Faults[k] += n
		}
		for _, v := range h.Violations {
			t.Violations[v.Rule]++
		}
		if h.Linearizable != "" {
			t.Lin[h.Linearizable]++
		}
	}
	if err != nil {
		t.Errors++
		if h != nil {
			t.Seeds = append(t.Seeds, h.Seed)
		}
	}
}

// Table is the soak's summary as markdown rows.
func (t *Totals) Table() []string {
	nv := 0
	for _, n := range t.Violations {
		nv += n
	}
	faults, armed := 0, map[string]int{}
	injected := map[string]int{}
	for k, n := range t.Faults {
		if strings.HasSuffix(k, "-armed") {
			armed[k] = n // a point armed is a fault only once reached
			continue
		}
		injected[k] = n
		faults += n
	}
	rows := []string{
		"| measure | value |", "| --- | --- |",
		fmt.Sprintf("| schedules run | %d (seeds %d-%d) |", t.Schedules, t.First, t.Last),
		fmt.Sprintf("| steps | %d |", t.Steps),
		fmt.Sprintf("| faults injected | %d (%s) |", faults, FaultString(injected)),
		fmt.Sprintf("| crash points armed for an op | %s |", FaultString(armed)),
		fmt.Sprintf("| invariant violations | %d (%s) |", nv, FaultString(t.Violations)),
		fmt.Sprintf("| registry history (porcupine) | %s |", FaultString(t.Lin)),
		fmt.Sprintf("| schedules failed | %d %v |", t.Errors, t.Seeds),
		fmt.Sprintf("| fleet set-ups retried | %d |", t.SetupRetries),
		fmt.Sprintf("| final recovery, total | %v |", t.Settle.Round(time.Millisecond)),
		fmt.Sprintf("| wall time | %v |", t.Wall.Round(time.Second)),
	}
	return rows
}
