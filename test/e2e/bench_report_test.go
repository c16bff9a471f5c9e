//go:build e2e

package e2e_test

import (
	"fmt"
	"sort"
	"strings"
	"time"
)

// benchLabels name the methods in the table.
var benchLabels = map[string]string{
	methodVtpmctl: "`vtpmctl migrate`",
	methodHook:    "`virsh migrate` + vtpmm hook",
	methodVirsh:   "plain `virsh migrate` (pre-defined secret)",
}

// benchReport is everything one run measured (the JSON file).
type benchReport struct {
	Started string `json:"started"`
	Host    string `json:"host"`
	CPUs    int    `json:"cpus"`
	DevKVM  bool   `json:"dev_kvm"`
	VM      string `json:"vm"`
	// Registry is the fleet registry's mode the hosts ran with.
	Registry string `json:"registry"`
	Rounds   int    `json:"rounds"`
	// RoundsPlanned were asked for; Budget bounds the default run ("0s":
	// none) and BudgetStop says why it ended early.
	RoundsPlanned int       `json:"rounds_planned"`
	Budget        string    `json:"budget"`
	BudgetStop    string    `json:"budget_stop,omitempty"`
	Command       string    `json:"command"`
	LoadStart     float64   `json:"load1_start"`
	LoadEnd       float64   `json:"load1_end"`
	RoundLoad     []float64 `json:"round_load1"`
	SetupSeconds  float64   `json:"setup_s"`
	Seconds       float64   `json:"total_s"`
	// Methods are the statistics over the rounds (not the warm-up).
	Methods []benchSummary `json:"methods"`
	// Samples are every migration, the warm-up included (round -1).
	Samples []benchSample `json:"samples"`
}

// benchSummary is one method's statistics over the rounds.
type benchSummary struct {
	Method string `json:"method"`
	Label  string `json:"label"`
	// Accel is what the destination's domain XML and QEMU command line
	// said after each run: "tcg" or "kvm", or every value seen.
	Accel       string  `json:"accel"`
	Runs        int     `json:"runs"`
	Wall        ms      `json:"median_wall_ms"`
	WallMin     ms      `json:"min_wall_ms"`
	WallMax     ms      `json:"max_wall_ms"`
	WallP25     ms      `json:"p25_wall_ms"`
	WallP75     ms      `json:"p75_wall_ms"`
	JobRuns     int     `json:"job_runs"`
	Job         ms      `json:"median_job_ms"`
	Downtime    ms      `json:"median_downtime_ms"`
	DowntimeMin ms      `json:"min_downtime_ms"`
	DowntimeMax ms      `json:"max_downtime_ms"`
	Outside     ms      `json:"median_outside_job_ms"` // median of wall - job
	OutsideFrac float64 `json:"median_outside_job_share"`
	Settle      ms      `json:"median_settle_ms,omitempty"`
	// VtpmdOwn is the median of vtpmd's own phases per run (attest, wrap,
	// prepare, commit: vtpmm_migration_phase_seconds_sum, both hosts; not
	// the hypervisor phase, which is libvirt's migration).
	VtpmdOwn ms `json:"median_vtpmd_phases_ms"`
	// Hooks is the median time libvirtd spent in vtpmm's qemu hook per run
	// (HookDst of it on the destination, inside libvirt's job); HookRuns
	// counts the hook's runs over all the rounds.
	Hooks    ms      `json:"median_hooks_ms"`
	HookDst  ms      `json:"median_hooks_dst_ms"`
	HookRuns int     `json:"hook_runs"`
	SrcTPM   float64 `json:"median_src_tpm"`
	DstTPM   float64 `json:"median_dst_tpm"`
	// SrcTPMRuns and DstTPMRuns count the runs by their number of host
	// TPM commands (a destination whose evidence is older than
	// evidence_max_age is attested again: 4 more commands).
	SrcTPMRuns map[int]int `json:"src_tpm_runs"`
	DstTPMRuns map[int]int `json:"dst_tpm_runs"`
	// Ratio is this method's median wall over plain virsh's; the per-round
	// ratios divide by plain virsh's wall in the same round.
	Ratio         float64 `json:"ratio_to_virsh"`
	RoundRatio    float64 `json:"median_round_ratio"`
	RoundRatioMin float64 `json:"min_round_ratio"`
	RoundRatioMax float64 `json:"max_round_ratio"`
	RoundRatioP25 float64 `json:"p25_round_ratio"`
	RoundRatioP75 float64 `json:"p75_round_ratio"`
}

// summarize fills Methods from the samples of the rounds.
func (r *benchReport) summarize() {
	virshByRound := map[int]ms{}
	for _, s := range r.Samples {
		if s.Round >= 0 && s.Method == methodVirsh {
			virshByRound[s.Round] = s.Wall
		}
	}
	r.Methods = nil
	for _, m := range benchMethods {
		sum := benchSummary{Method: m, Label: benchLabels[m]}
		var wall, job, down, outside, settle, own, hooks, hookDst []float64
		var frac, ratios []float64
		var src, dst []int
		accels := map[string]bool{}
		for _, s := range r.Samples {
			if s.Round < 0 || s.Method != m {
				continue
			}
			wall = append(wall, float64(s.Wall))
			if s.JobOK {
				job, down = append(job, float64(s.Job)), append(down, float64(s.Downtime))
				outside = append(outside, float64(s.Wall-s.Job))
				frac = append(frac, float64(s.Wall-s.Job)/float64(s.Wall))
			}
			if s.Settle > 0 {
				settle = append(settle, float64(s.Settle))
			}
			if v, ok := virshByRound[s.Round]; ok && v > 0 {
				ratios = append(ratios, float64(s.Wall)/float64(v))
			}
			src, dst = append(src, s.SrcTPM), append(dst, s.DstTPM)
			own = append(own, vtpmdOwn(s))
			var hs, hd float64
			for k, v := range s.Hooks {
				hs += v
				if strings.HasPrefix(k, "dst:") {
					hd += v
				}
			}
			hooks, hookDst = append(hooks, hs*float64(time.Millisecond)), append(hookDst, hd*float64(time.Millisecond))
			sum.HookRuns += s.HookRuns
			accels[s.Accel.String()] = true
		}
		sum.Runs, sum.JobRuns = len(wall), len(job)
		sum.Accel = joinKeys(accels)
		sum.Wall, sum.WallMin, sum.WallMax = ms(quantile(wall, 0.5)), ms(quantile(wall, 0)), ms(quantile(wall, 1))
		sum.WallP25, sum.WallP75 = ms(quantile(wall, 0.25)), ms(quantile(wall, 0.75))
		sum.Job, sum.Downtime = ms(quantile(job, 0.5)), ms(quantile(down, 0.5))
		sum.DowntimeMin, sum.DowntimeMax = ms(quantile(down, 0)), ms(quantile(down, 1))
		sum.Outside, sum.OutsideFrac = ms(quantile(outside, 0.5)), quantile(frac, 0.5)
		sum.Settle, sum.VtpmdOwn = ms(quantile(settle, 0.5)), ms(quantile(own, 0.5))
		sum.Hooks, sum.HookDst = ms(quantile(hooks, 0.5)), ms(quantile(hookDst, 0.5))
		sum.SrcTPM, sum.DstTPM = quantile(ints(src), 0.5), quantile(ints(dst), 0.5)
		sum.SrcTPMRuns, sum.DstTPMRuns = histogram(src), histogram(dst)
		sum.RoundRatio, sum.RoundRatioMin, sum.RoundRatioMax = quantile(ratios, 0.5), quantile(ratios, 0), quantile(ratios, 1)
		sum.RoundRatioP25, sum.RoundRatioP75 = quantile(ratios, 0.25), quantile(ratios, 0.75)
		r.Methods = append(r.Methods, sum)
	}
	var base ms
	for _, s := range r.Methods {
		if s.Method == methodVirsh {
			base = s.Wall
		}
	}
	for i := range r.Methods {
		if base > 0 {
			r.Methods[i].Ratio = float64(r.Methods[i].Wall) / float64(base)
		}
	}
}

// table renders the summary, then details and the warm-up runs.
func (r *benchReport) table() string {
	var b strings.Builder
	accels := map[string]bool{}
	for _, s := range r.Methods {
		accels[s.Accel] = true
	}
	rounds := fmt.Sprint(r.Rounds)
	if r.BudgetStop != "" {
		rounds += " (stopped " + r.BudgetStop + ")"
	}
	fmt.Fprintf(&b, "vtpmm e2e bench, %s: %s; %s rounds after a warm-up round trip, host-a <-> host-b; fleet registry %s; accelerator %s "+
		"(read on each destination from the domain XML and the QEMU command line; /dev/kvm present: %v)\n",
		r.Started, r.VM, rounds, orNone(r.Registry), joinKeys(accels), r.DevKVM)
	fmt.Fprintf(&b, "%d CPUs; load average %.2f at the start, %.2f at the end, %.2f-%.2f (median %.2f) at the rounds' starts; "+
		"set-up %.0f s, total %.0f s\n", r.CPUs, r.LoadStart, r.LoadEnd, quantile(r.RoundLoad, 0), quantile(r.RoundLoad, 1),
		quantile(r.RoundLoad, 0.5), r.SetupSeconds, r.Seconds)
	fmt.Fprintf(&b, "| method | accelerator | rounds | median wall | median libvirt job | median downtime | ratio to plain virsh | per-round ratio: median (min-max) | host TPM cmds src / dst |\n")
	fmt.Fprintf(&b, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, s := range r.Methods {
		ratio, round := "1", "1"
		if s.Method != methodVirsh {
			ratio = fmt.Sprintf("%.3f", s.Ratio)
			round = fmt.Sprintf("%.3f (%.3f-%.3f)", s.RoundRatio, s.RoundRatioMin, s.RoundRatioMax)
		}
		fmt.Fprintf(&b, "| %s | %s | %d | %v | %v | %v | %s | %s | %s |\n", s.Label, s.Accel, s.Runs, s.Wall, s.Job,
			s.Downtime, ratio, round, tpmCell(s))
	}
	var base ms
	for _, s := range r.Methods {
		if s.Method == methodVirsh {
			base = s.Wall
		}
	}
	for _, s := range r.Methods {
		if s.Method != methodVirsh {
			fmt.Fprintf(&b, "%s: ratio %.3f to plain virsh (budget: at most 1.10), median wall %+v\n", s.Label, s.Ratio,
				time.Duration(s.Wall-base).Round(time.Millisecond))
		}
	}
	fmt.Fprintf(&b, "\n| method | wall min-max | wall p25-p75 | per-round ratio p25-p75 | median wall - job | share of wall outside libvirt's job | vtpmd's own phases | hook runs: time (on dst) | downtime min-max | settled after virsh returned |\n")
	fmt.Fprintf(&b, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, s := range r.Methods {
		iqr, settle, own, hooks := "-", "-", "-", "0"
		if s.Method != methodVirsh {
			iqr = fmt.Sprintf("%.3f-%.3f", s.RoundRatioP25, s.RoundRatioP75)
			own = s.VtpmdOwn.String()
		}
		if s.Settle > 0 {
			settle = s.Settle.String()
		}
		if s.HookRuns > 0 {
			hooks = fmt.Sprintf("%d: %v (%v)", s.HookRuns, s.Hooks, s.HookDst)
		}
		fmt.Fprintf(&b, "| %s | %v-%v | %v-%v | %s | %v | %.1f %% | %s | %s | %v-%v | %s |\n", s.Label, s.WallMin, s.WallMax,
			s.WallP25, s.WallP75, iqr, s.Outside, 100*s.OutsideFrac, own, hooks, s.DowntimeMin, s.DowntimeMax, settle)
	}
	fmt.Fprintf(&b, "\nwarm-up (not in the statistics: first p2p connection per source libvirtd, first attestation per destination):\n")
	for _, s := range r.Samples {
		if s.Round < 0 {
			fmt.Fprintf(&b, "  %s\n", s)
		}
	}
	return b.String()
}

// vtpmdOwn is the sum of vtpmd's phases in a run but libvirt's own.
func vtpmdOwn(s benchSample) float64 {
	var sum float64
	for k, v := range s.Phases {
		if !strings.HasSuffix(k, ":hypervisor") {
			sum += v
		}
	}
	return sum * float64(time.Millisecond)
}

// tpmCell is "src / dst" commands per migration: the value when every
// run had the same, else each value with its number of runs.
func tpmCell(s benchSummary) string {
	return histCell(s.SrcTPMRuns) + " / " + histCell(s.DstTPMRuns)
}

func histCell(h map[int]int) string {
	if len(h) == 1 {
		for v := range h {
			return fmt.Sprint(v)
		}
	}
	vals := make([]int, 0, len(h))
	for v := range h {
		vals = append(vals, v)
	}
	sort.Ints(vals)
	var parts []string
	for _, v := range vals {
		parts = append(parts, fmt.Sprintf("%d (%dx)", v, h[v]))
	}
	return strings.Join(parts, ", ")
}

func histogram(xs []int) map[int]int {
	h := map[int]int{}
	for _, x := range xs {
		h[x]++
	}
	return h
}

// quantile is the q-quantile of xs with linear interpolation (0: min,
// 0.5: median, 1: max); 0 for no values.
func quantile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	pos := q * float64(len(s)-1)
	lo := int(pos)
	if lo >= len(s)-1 {
		return s[len(s)-1]
	}
	return s[lo] + (pos-float64(lo))*(s[lo+1]-s[lo])
}

func ints(xs []int) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = float64(x)
	}
	return out
}

func joinKeys(m map[string]bool) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return strings.Join(keys, " + ")
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
