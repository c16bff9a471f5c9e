// Package model checks vtpmm's ownership protocol (vtpmm.pml) with SPIN:
// the model must hold every property in each configuration, and each
// mutation (a rule removed) must be refuted with a trail that violates the
// property the mutation targets. docs/model.md explains the model.
package model

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// run is one SPIN verification: flags for spin -a, and what must happen.
type run struct {
	name  string
	flags []string
	// refute: the property (hidden flag of vtpmm.pml) the trail must
	// violate; empty means the model must hold.
	refute string
}

var configs = []run{
	{name: "migrate", flags: nil},
	{name: "hook", flags: []string{"-DB_MIG=0", "-DB_JOB=1"}},
}

var mutations = []run{
	{name: "F1 today's start gate admits a PENDING key", flags: []string{"-DTODAY_GATE", "-DONLY_P1"}, refute: "p1_two_owners"},
	{name: "F2 start gate ignores an open transaction", flags: []string{"-DTODAY_GATE_OPENTX", "-DONLY_P1"}, refute: "p1_two_owners"},
	{name: "M source shreds before the destination confirms", flags: []string{"-DM_EARLYSHRED", "-DONLY_P3"}, refute: "p3_not_settled"},
}

func tools(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"spin", "gcc"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("VTPMM_E2E_REQUIRE") == "1" {
				t.Fatalf("VTPMM_E2E_REQUIRE=1: %s is missing (make deps installs it): %v", tool, err)
			}
			t.Skipf("%s is missing (make deps installs it)", tool)
		}
	}
}

var (
	statesRE = regexp.MustCompile(`(?m)^\s*(\d+) states, stored`)
	violRE   = regexp.MustCompile(`assertion violated\s+!\((\w+)\)`)
	errorsRE = regexp.MustCompile(`errors: (\d+)`)
)

// verify runs spin -a, gcc and pan in a fresh directory; it returns pan's
// output, the states stored and the time taken.
func verify(t *testing.T, r run) (string, string, time.Duration) {
	t.Helper()
	src, err := filepath.Abs("vtpmm.pml")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "vtpmm.pml"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	sh := func(name string, args ...string) string {
		cmd := exec.CommandContext(ctx, name, args...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil && name != "./pan" {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	start := time.Now()
	sh("spin", append(append([]string{"-a"}, r.flags...), "vtpmm.pml")...)
	sh("gcc", "-O2", "-DSAFETY", "-DCOLLAPSE", "-DMEMLIM=3000", "-w", "-o", "pan", "pan.c")
	out := sh("./pan", "-m3000000", "-w24")
	took := time.Since(start)
	states := "?"
	if m := statesRE.FindStringSubmatch(out); m != nil {
		states = m[1]
	}
	if r.refute != "" {
		// The trail must replay and show the violation.
		if _, err := os.Stat(filepath.Join(dir, "vtpmm.pml.trail")); err != nil {
			t.Fatalf("%s: no trail: %v\n%s", r.name, err, out)
		}
		replay := sh("spin", append(append([]string{"-t"}, r.flags...), "vtpmm.pml")...)
		if !strings.Contains(replay, "assertion violated") {
			t.Fatalf("%s: the trail does not replay to a violation:\n%s", r.name, tail(replay))
		}
	}
	return out, states, took
}

func tail(s string) string {
	if len(s) > 3000 {
		return s[len(s)-3000:]
	}
	return s
}

// TestModelHolds: every property holds in every configuration.
func TestModelHolds(t *testing.T) {
	tools(t)
	for _, r := range configs {
		t.Run(r.name, func(t *testing.T) {
			out, states, took := verify(t, r)
			if m := errorsRE.FindStringSubmatch(out); m == nil || m[1] != "0" {
				v := violRE.FindStringSubmatch(out)
				t.Fatalf("model %s: SPIN found a violation %v:\n%s", r.name, v, tail(out))
			}
			t.Logf("TABLE | %s | all | %s | %.1fs | - | -", r.name, states, took.Seconds())
		})
	}
}

// TestMutationsRefuted: each mutation breaks the property it targets, so
// the model cannot silently become vacuous.
func TestMutationsRefuted(t *testing.T) {
	tools(t)
	for _, r := range mutations {
		t.Run(r.name, func(t *testing.T) {
			out, states, took := verify(t, r)
			v := violRE.FindStringSubmatch(out)
			if v == nil {
				t.Fatalf("mutation %q was not refuted (SPIN found no violation): the model may be vacuous\n%s", r.name, tail(out))
			}
			if v[1] != r.refute {
				t.Fatalf("mutation %q violated %s, want %s", r.name, v[1], r.refute)
			}
			t.Logf("TABLE | %s | %s | %s | %.1fs | %s | yes", "migrate", r.refute, states, took.Seconds(), r.name)
		})
	}
}
