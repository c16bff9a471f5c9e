package evacuate_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/evacuate"
	"github.com/vtpmm/vtpmm/vtpm"
)

func TestExitCodes(t *testing.T) {
	rep := func(interrupted bool, outcomes ...evacuate.Outcome) *evacuate.Report {
		r := &evacuate.Report{Source: source, Interrupted: interrupted}
		for i, o := range outcomes {
			r.VMs = append(r.VMs, evacuate.VMReport{VM: vmID(i), Outcome: o})
		}
		r.Counts = map[evacuate.Outcome]int{}
		for _, v := range r.VMs {
			r.Counts[v.Outcome]++
		}
		return r
	}
	tests := []struct {
		name string
		rep  *evacuate.Report
		err  error
		want int
	}{
		{"all moved", rep(false, evacuate.OutcomeMoved, evacuate.OutcomeSkipped), nil, evacuate.ExitOK},
		{"refused, nothing left", rep(false, evacuate.OutcomeMoved, evacuate.OutcomeRefused), nil, evacuate.ExitRefused},
		{"no room", rep(false, evacuate.OutcomeUnplaced), nil, evacuate.ExitRefused},
		{"failed and rolled back", rep(false, evacuate.OutcomeRefused, evacuate.OutcomeFailed), nil, evacuate.ExitFailed},
		{"left open", rep(false, evacuate.OutcomeFailed, evacuate.OutcomeOpen), nil, evacuate.ExitOpen},
		{"interrupted", rep(true, evacuate.OutcomeMoved, evacuate.OutcomeNotStarted), nil, evacuate.ExitInterrupted},
		{"interrupted after a failure", rep(true, evacuate.OutcomeFailed, evacuate.OutcomeNotStarted), nil, evacuate.ExitFailed},
		{"busy", nil, fmt.Errorf("x: %w", evacuate.ErrBusy), evacuate.ExitBusy},
		{"stopped while planning", nil, fmt.Errorf("x: %w: %w", evacuate.ErrStopped, context.Canceled), evacuate.ExitInterrupted},
		{"registry down", nil, errors.New("etcd: no leader"), evacuate.ExitError},
	}
	for _, tc := range tests {
		if tc.rep != nil {
			tc.rep.ExitCode = evacuate.ReportExitCode(tc.rep)
		}
		if got := evacuate.ExitCode(tc.rep, tc.err); got != tc.want {
			t.Errorf("%s: exit %d, want %d", tc.name, got, tc.want)
		}
	}
}

func TestReportText(t *testing.T) {
	f := newFleet(t, 3, GiB, 40*GiB)
	rep, err := f.evacuator(t, f.process(), nil).Run(ctxT(t), evacuate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	if err := rep.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"VM", "OUTCOME", "RUNS ON", "vm001", "moved", "host-b", "to host-b", "evacuation of host-a: 3 moved"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, b.String())
		}
	}
}

// TestTPMModel: the cost model behind docs/evacuation.md's numbers.
func TestTPMModel(t *testing.T) {
	tests := []struct {
		batches, cold, cmds int
		ms                  int64
	}{
		{4, 0, 16, 1400}, // warm: 4 x (Import 200 + Load, Unseal, Flush 3 x 50)
		{4, 4, 32, 3400}, // cold: + 4 x (Certify 200 + Quote 200 + 2 PCR_Read 50)
		{4, 1, 20, 1900}, // one destination cold: the most the 2 s budget allows
		{7, 0, 28, 2450}, // 4 batches + 3 follow-ups after a refusal half way
	}
	for _, tc := range tests {
		m := evacuate.ModelTPM(vtpm.ProfileDTPM, tc.batches, tc.cold)
		if m.Commands != tc.cmds || m.Time.Milliseconds() != tc.ms {
			t.Errorf("%d batches, %d cold: %d commands, %s; want %d, %d ms", tc.batches, tc.cold, m.Commands, m.Time, tc.cmds, tc.ms)
		}
	}
}
