package evacuate_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/migrate/evacuate"
)

// render runs a small evacuation (6 VMs, one of them failing) through a
// renderer and returns what it wrote.
func render(t *testing.T, o evacuate.RenderOptions, dryRun bool) string {
	t.Helper()
	f := newFleet(t, 6, GiB, 40*GiB, 40*GiB, 40*GiB)
	p := f.process()
	p.mover.DropKey = map[string]bool{f.ids[2]: true}
	p.mover.Refuse("host-d", attest.RuleSecureBoot, "secure boot is not enabled")
	var out bytes.Buffer
	r := evacuate.NewRenderer(&out, o)
	rep, err := f.evacuator(t, p, r).Run(ctxT(t), evacuate.Options{DryRun: dryRun})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if want := map[bool]int{false: evacuate.ExitFailed, true: evacuate.ExitOK}[dryRun]; rep.ExitCode != want {
		t.Fatalf("exit %d, want %d", rep.ExitCode, want)
	}
	return out.String()
}

// TestJSONEvents: every line is one event of the documented schema, the
// plan first and the report last.
func TestJSONEvents(t *testing.T) {
	out := render(t, evacuate.RenderOptions{JSON: true}, false)
	var types []evacuate.EventType
	done := map[string]evacuate.Outcome{}
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("not one JSON object per line: %v: %s", err, sc.Text())
		}
		var e evacuate.Event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatal(err)
		}
		if e.V != evacuate.EventSchema || e.Source != source || e.Time.IsZero() {
			t.Errorf("event header: %s", sc.Text())
		}
		types = append(types, e.Type)
		switch e.Type {
		case evacuate.EventPlan:
			if e.Plan == nil || len(e.Plan.Assignments) != 6 {
				t.Errorf("plan event: %s", sc.Text())
			}
		case evacuate.EventVMPhase:
			if e.VM == "" || e.Phase == "" || e.Dest == "" {
				t.Errorf("vm-phase event: %s", sc.Text())
			}
		case evacuate.EventVMDone:
			done[e.VM] = e.Result.Outcome
		case evacuate.EventHostRefused:
			if e.Host != "host-d" || e.Rule != string(attest.RuleSecureBoot) {
				t.Errorf("host-refused event: %s", sc.Text())
			}
		case evacuate.EventReport:
			if e.Report == nil || e.Report.ExitCode != evacuate.ExitFailed || len(e.Report.VMs) != 6 {
				t.Errorf("report event: %s", sc.Text())
			}
		default:
			t.Errorf("undocumented event type %q", e.Type)
		}
	}
	if len(types) == 0 || types[0] != evacuate.EventHostRefused && types[0] != evacuate.EventVMPhase && types[0] != evacuate.EventPlan {
		t.Fatalf("event order %v", types)
	}
	if types[len(types)-1] != evacuate.EventReport {
		t.Errorf("last event %s, want report", types[len(types)-1])
	}
	if len(done) != 6 {
		t.Errorf("vm-done for %d VMs, want 6", len(done))
	}
}

var ansi = regexp.MustCompile("\x1b\\[[0-9;]*[A-Za-z]")

// TestPlainOutput: no terminal, so plain lines: a phase change per line,
// an outcome per VM, the report; no escape sequences.
func TestPlainOutput(t *testing.T) {
	out := render(t, evacuate.RenderOptions{}, false)
	if ansi.MatchString(out) {
		t.Error("escape sequences in plain output")
	}
	for _, want := range []string{
		"evacuate host-a: plan: 6 VMs to 2 hosts",
		"host host-d",
		"left out: refused (rule secure-boot)",
		"vm000                moved    runs on host-",
		"vm002                failed   runs on host-a",
		"destination lacks the vTPM secret",
		"evacuation of host-a: 5 moved, 1 failed",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("plain output lacks %q:\n%s", want, out)
		}
	}
	if n := strings.Count(out, " migrate  -> "); n != 6 {
		t.Errorf("%d migrate lines, want one per VM (bytes moving on are not logged):\n%s", n, out)
	}
}

// TestDryRunOutput lists every VM's destination and every host left out.
func TestDryRunOutput(t *testing.T) {
	out := render(t, evacuate.RenderOptions{}, true)
	for _, want := range []string{"dry run: nothing moves", "-> host-b", "-> host-c", "left out: refused (rule secure-boot): host-d: rule secure-boot", "planned"} {
		if !strings.Contains(out, want) {
			t.Errorf("dry run output lacks %q:\n%s", want, out)
		}
	}
	if strings.Count(out, "  vm   ") != 6 {
		t.Errorf("not every VM listed in the plan:\n%s", out)
	}
}

// TestTerminalOutput: on a terminal the VM lines are redrawn in place
// (cursor up, clear) and each VM ends on a final line, then the report.
func TestTerminalOutput(t *testing.T) {
	out := render(t, evacuate.RenderOptions{Terminal: true, Width: 120, Height: 30}, false)
	if !strings.Contains(out, "\x1b[") || !regexp.MustCompile("\x1b\\[[0-9]+A\x1b\\[J").MatchString(out) {
		t.Fatalf("no in-place updates in terminal output: %q", out)
	}
	plain := ansi.ReplaceAllString(out, "")
	for i := range 6 {
		name := "vm00" + string(rune('0'+i))
		if !regexp.MustCompile(name + `\s+(moved|failed)\s+runs on host-`).MatchString(plain) {
			t.Errorf("no final line for %s:\n%s", name, plain)
		}
	}
	if !strings.Contains(plain, "evacuation of host-a: 5 moved, 1 failed") {
		t.Errorf("no report:\n%s", plain)
	}
}

func TestIsTerminal(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if evacuate.IsTerminal(f) {
		t.Error("a file is a terminal")
	}
}

// TestTerminalManyVMs: 100 VMs on a 20-line terminal; every VM still gets
// its final line (finished lines leave the live area for good).
func TestTerminalManyVMs(t *testing.T) {
	f := newFleet(t, 100, GiB, 40*GiB, 40*GiB, 40*GiB, 40*GiB)
	var out bytes.Buffer
	r := evacuate.NewRenderer(&out, evacuate.RenderOptions{Terminal: true, Width: 100, Height: 20})
	rep, err := f.evacuator(t, f.process(), r).Run(ctxT(t), evacuate.Options{})
	if err != nil || rep.ExitCode != evacuate.ExitOK {
		t.Fatalf("%v, exit %d", err, rep.ExitCode)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	plain := ansi.ReplaceAllString(out.String(), "")
	for i := range 100 {
		name := fmt.Sprintf("vm%03d", i)
		if !regexp.MustCompile(name + `\s+moved\s+runs on host-. at generation 2`).MatchString(plain) {
			t.Fatalf("no final line for %s:\n%s", name, plain)
		}
	}
}
