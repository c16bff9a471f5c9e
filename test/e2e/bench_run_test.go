//go:build e2e

package e2e_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/lab"
)

// ms is a duration that JSON shows in milliseconds.
type ms time.Duration

func (d ms) MarshalJSON() ([]byte, error) {
	return []byte(strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'f', 3, 64)), nil
}

func (d ms) String() string { return time.Duration(d).Round(time.Millisecond).String() }

// benchSample is one measured migration.
type benchSample struct {
	At       time.Time `json:"at"`
	Round    int       `json:"round"`    // 0-based; -1 for the warm-up
	Position int       `json:"position"` // 0, 1 or 2: when it ran in its round
	Method   string    `json:"method"`
	Src      string    `json:"src"`
	Dst      string    `json:"dst"`
	Wall     ms        `json:"wall_ms"` // around the vtpmctl or virsh process
	// Job and Downtime are libvirt's completed job on the destination
	// (JobOK false when they could not be read).
	Job      ms   `json:"job_ms"`
	Downtime ms   `json:"downtime_ms"`
	JobOK    bool `json:"job_ok"`
	// Settle (hook mode) is from virsh's return until exactly one host owns
	// the key again, with no transaction open (polled every 200 ms).
	Settle ms `json:"settle_ms,omitempty"`
	// Host TPM commands on each side during the run (settling included).
	SrcTPM    int            `json:"src_tpm"`
	DstTPM    int            `json:"dst_tpm"`
	TPMByName map[string]int `json:"tpm_by_name,omitempty"` // "src:"/"dst:" + command
	// Phases is vtpmd's vtpmm_migration_phase_seconds_sum during the run,
	// by "src:"/"dst:" + phase, in ms.
	Phases map[string]float64 `json:"phases_ms,omitempty"`
	// Hooks is the time libvirtd spent running vtpmm's qemu hook during
	// the run, by "src:"/"dst:" + event, in ms (from its debug log);
	// HookRuns counts the runs (0 when the hook is off).
	Hooks    map[string]float64 `json:"hooks_ms,omitempty"`
	HookRuns int                `json:"hook_runs"`
	// Accel is what the VM ran with on the destination afterwards.
	Accel lab.Accel `json:"accel"`
	Load1 float64   `json:"load1"` // load average when its round began
}

func (s benchSample) String() string {
	r := fmt.Sprintf("%-7s %s->%s: wall %v, libvirt job %v, downtime %v, host TPM commands src %d dst %d %v, %s",
		s.Method, s.Src, s.Dst, s.Wall, s.Job, s.Downtime, s.SrcTPM, s.DstTPM, s.TPMByName, s.Accel)
	if s.Settle > 0 {
		r += fmt.Sprintf(", settled %v after virsh returned", s.Settle)
	}
	if s.HookRuns > 0 {
		r += fmt.Sprintf(", %d hook runs %s", s.HookRuns, msMap(s.Hooks))
	}
	if len(s.Phases) > 0 {
		r += ", vtpmd phases " + msMap(s.Phases)
	}
	return r
}

// msMap renders a map of milliseconds sorted by key.
func msMap(m map[string]float64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var ps []string
	for _, k := range keys {
		ps = append(ps, fmt.Sprintf("%s %.0fms", k, m[k]))
	}
	return strings.Join(ps, ", ")
}

// benchCtx is the benchmark's fleet and its VMs by method.
type benchCtx struct {
	f   *lab.Fleet
	c   fleet.Fleet
	vms map[string]*lab.VM
	// logAt is how far each host's libvirtd log was read for hook runs.
	logAt map[string]int64
}

// hookRuns adds the hook runs h's libvirtd logged since the last call to
// s (prefix "src:" or "dst:").
func (bc *benchCtx) hookRuns(t *testing.T, h *lab.FleetHost, prefix string, s *benchSample) {
	t.Helper()
	runs, next, err := h.HookRuns(bc.logAt[h.Name])
	if err != nil {
		t.Fatalf("%s: hook runs: %v", h.Name, err)
	}
	bc.logAt[h.Name] = next
	if s == nil {
		return
	}
	for _, r := range runs {
		s.HookRuns++
		if r.Took >= 0 {
			s.Hooks[prefix+r.Event] += float64(r.Took) / float64(time.Millisecond)
		}
	}
}

func (bc *benchCtx) fvm(method string) fleet.VM {
	return fleet.VM{Name: bc.vms[method].Name, UUID: bc.vms[method].UUID}
}

// run moves the method's VM from src to dst and measures it. It fails the
// test when the migration fails or leaves the wrong owner.
func (bc *benchCtx) run(ctx context.Context, t *testing.T, round, pos int, method string, src, dst *lab.FleetHost) benchSample {
	t.Helper()
	vm := bc.vms[method]
	s := benchSample{At: time.Now().UTC(), Round: round, Position: pos, Method: method, Src: src.Name, Dst: dst.Name}
	srcBefore, dstBefore := scrape(ctx, t, src), scrape(ctx, t, dst)
	bc.hookRuns(t, src, "", nil)
	bc.hookRuns(t, dst, "", nil)
	rctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	switch method {
	case methodVtpmctl:
		t0 := time.Now()
		r, err := src.Vtpmd.Ctl(rctx, "migrate", vm.Name, "--to", dst.Name)
		s.Wall = ms(time.Since(t0))
		if err != nil || r.Code != 0 {
			t.Fatalf("vtpmctl migrate %s --to %s: %v %s", vm.Name, dst.Name, err, r)
		}
		if owner, report, err := fleet.Owner(ctx, bc.c, bc.fvm(method)); err != nil || owner != dst.Name {
			t.Fatalf("after vtpmctl migrate %s->%s: owner %q, %v\n%s", src.Name, dst.Name, owner, err, report)
		}
	case methodHook:
		setHooks(t, true, src, dst)
		s.Wall = virshMigrate(rctx, t, vm, src, dst)
		t0 := time.Now()
		if err := fleet.WaitOwner(ctx, bc.c, bc.fvm(method), dst.Name, time.Minute); err != nil {
			t.Fatalf("after virsh migrate %s->%s in hook mode: %v", src.Name, dst.Name, err)
		}
		s.Settle = ms(time.Since(t0))
		setHooks(t, false, src, dst)
	case methodVirsh:
		if has, err := dst.Hyp.HasSecret(ctx, vm.UUID); err != nil || !has {
			t.Fatalf("%s: the predefined secret of %s is missing: %v", dst.Name, vm.Name, err)
		}
		s.Wall = virshMigrate(rctx, t, vm, src, dst)
		for h, want := range map[*lab.FleetHost]hypervisor.State{src: hypervisor.StateAbsent, dst: hypervisor.StateRunning} {
			d, err := h.Hyp.Domain(ctx, vm.UUID)
			if err != nil || d.State != want {
				t.Fatalf("after virsh migrate %s->%s: %s on %s is %q (%v), want %q", src.Name, dst.Name, vm.Name, h.Name, d.State, err, want)
			}
		}
	default:
		t.Fatalf("unknown method %q", method)
	}
	srcAfter, dstAfter := scrape(ctx, t, src), scrape(ctx, t, dst)
	s.Hooks = map[string]float64{}
	bc.hookRuns(t, src, "src:", &s)
	bc.hookRuns(t, dst, "dst:", &s)
	s.TPMByName, s.Phases = map[string]int{}, map[string]float64{}
	s.SrcTPM = diffCommands(s.TPMByName, "src:", srcBefore.TPMCommands(), srcAfter.TPMCommands())
	s.DstTPM = diffCommands(s.TPMByName, "dst:", dstBefore.TPMCommands(), dstAfter.TPMCommands())
	diffPhases(s.Phases, "src:", srcBefore, srcAfter)
	diffPhases(s.Phases, "dst:", dstBefore, dstAfter)
	if js, err := dst.Hyp.CompletedJobStats(ctx, vm.UUID); err != nil {
		t.Logf("%s: completed job stats of %s: %v", dst.Name, vm.Name, err)
	} else {
		s.Job, s.Downtime, s.JobOK = ms(js.Elapsed), ms(js.Downtime), true
	}
	a, err := dst.Accelerator(ctx, vm.Name)
	if err != nil {
		t.Fatalf("accelerator of %s on %s: %v", vm.Name, dst.Name, err)
	}
	s.Accel = a
	return s
}

// virshMigrate runs the real virsh in src's namespaces, as an operator on
// that host would, and returns its wall time.
func virshMigrate(ctx context.Context, t *testing.T, vm *lab.VM, src, dst *lab.FleetHost) ms {
	t.Helper()
	cmd, err := src.NsCommand(ctx, "virsh", "-c", "qemu:///system", "migrate", "--live", "--p2p",
		"--persistent", "--undefinesource", vm.Name, "qemu+tcp://"+dst.IP+"/system")
	if err != nil {
		t.Fatal(err)
	}
	cmd.WaitDelay = 5 * time.Second
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	wall := time.Since(t0)
	if err != nil {
		t.Fatalf("virsh migrate %s %s->%s: %v\n%s", vm.Name, src.Name, dst.Name, err, out)
	}
	return ms(wall)
}

func setHooks(t *testing.T, on bool, hosts ...*lab.FleetHost) {
	t.Helper()
	for _, h := range hosts {
		if err := h.SetHook(on); err != nil {
			t.Fatal(err)
		}
	}
}

func scrape(ctx context.Context, t *testing.T, h *lab.FleetHost) lab.Metrics {
	t.Helper()
	m, err := h.Vtpmd.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Family("vtpmm_tpm_commands_total", "command")) == 0 {
		t.Fatalf("%s: vtpmd exposes no vtpmm_tpm_commands_total", h.Name)
	}
	return m
}

// diffCommands adds after-before per name to into (prefix before the
// name) and returns the sum.
func diffCommands(into map[string]int, prefix string, before, after map[string]int) int {
	n := 0
	for name, v := range after {
		if d := v - before[name]; d != 0 {
			into[prefix+name] += d
			n += d
		}
	}
	return n
}

// diffPhases adds the growth of vtpmm_migration_phase_seconds_sum per
// phase, in ms.
func diffPhases(into map[string]float64, prefix string, before, after lab.Metrics) {
	b := before.Family("vtpmm_migration_phase_seconds_sum", "phase")
	for phase, v := range after.Family("vtpmm_migration_phase_seconds_sum", "phase") {
		if d := (v - b[phase]) * 1000; d > 0.0005 {
			into[prefix+phase] = math.Round(d*10) / 10
		}
	}
}

// loadavg is the 1-minute load average (0 if unreadable).
func loadavg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f, _ := strconv.ParseFloat(strings.Fields(string(b))[0], 64)
	return f
}

func numCPU() int { return runtime.NumCPU() }

// write stores the report as indented JSON.
func (r *benchReport) write(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
