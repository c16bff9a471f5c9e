//go:build e2e

package e2e_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/test/e2e"
)

// metricsPort is where each bench host's vtpmd serves Prometheus metrics
// (on the host's IP, inside its network namespace).
const metricsPort = 9450

// benchSample is one measured migration.
type benchSample struct {
	method   string // "vtpmctl" or "virsh"
	dir      string // e.g. "host-a->host-b"
	wall     time.Duration
	job      time.Duration // libvirt's completed job, read on the destination
	downtime time.Duration
	srcTPM   int // host TPM commands on the source vtpmd during the run
	dstTPM   int // and on the destination
}

// TestE2EBench compares, on the same two hosts, 'vtpmctl migrate' with a
// plain libvirt live migration by the real virsh (make e2e-bench; skipped
// unless VTPMM_E2E_BENCH=1).
//
// Scheme: two firmware-only KVM VMs of identical shape (128 MiB, 1 vCPU,
// TPM 2.0, no disk) start on host-a.
//   - vm-vtpmm is created by vtpmd (its key in host-a's vault) and is moved
//     only by 'vtpmctl migrate' on the source vtpmd's admin socket. vtpmd's
//     ledgers therefore stay right: after every hop exactly one host owns
//     its key (checked after each run).
//   - vm-plain is unknown to vtpmd (no key, no vm.json); its ephemeral
//     private secret (UUID libvirt.SecretUUID(vm), a random passphrase) is
//     defined by hand on BOTH hosts before the first run and stays defined
//     (virsh migrate does not undefine secrets). It is moved only by
//     'virsh -c qemu:///system migrate --live --p2p --persistent
//     --undefinesource vm-plain qemu+tcp://<dest IP>/system', run inside
//     the source host's namespaces as an operator on that host would.
//
// Round i moves both VMs in the same direction (A->B on even rounds, B->A
// on odd ones), so each method runs the same number of times per
// direction; which method goes first flips every two rounds (so neither
// method always runs first in the same direction). One VM moves at a
// time; the other idles.
func TestE2EBench(t *testing.T) {
	if os.Getenv("VTPMM_E2E_BENCH") != "1" {
		t.Skip("set VTPMM_E2E_BENCH=1 (make e2e-bench)")
	}
	if !e2e.KVM() {
		t.Skip("the benchmark needs /dev/kvm (a TCG firmware VM is too noisy)")
	}
	runs := 7
	if s := os.Getenv("VTPMM_E2E_BENCH_RUNS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("VTPMM_E2E_BENCH_RUNS=%q: want a positive integer", s)
		}
		runs = n
	}
	if _, err := os.Stat("/usr/bin/virsh"); err != nil {
		t.Skip("virsh not installed")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute+time.Duration(runs)*time.Minute)
	defer cancel()

	f := newVFleet(ctx, t, hostSpec{"host-a", "10.251.0.1", goodLog}, hostSpec{"host-b", "10.251.0.2", goodLog})
	a, b := f.hosts["host-a"], f.hosts["host-b"]
	for _, h := range []*vhost{a, b} {
		if err := appendConfig(h.d.ConfigPath, fmt.Sprintf("metrics_listen: %s:%d\n", h.IP, metricsPort)); err != nil {
			t.Fatal(err)
		}
	}
	spec := libvirt.VMSpec{MemoryMiB: 128, TPMVersion: "2.0"}
	vmv := f.createVM(ctx, a, "vm-vtpmm", spec)
	vmp := createPlainVM(ctx, t, spec, "vm-plain", a, b)
	f.start(ctx)
	if owner, report, err := f.owner(ctx, vmv); err != nil || owner != a.Name {
		t.Fatalf("before the first run: owner %q, %v\n%s", owner, err, report)
	}

	var samples []benchSample
	for i := 0; i < runs; i++ {
		src, dst := a, b
		if i%2 == 1 {
			src, dst = b, a
		}
		methods := []string{"vtpmctl", "virsh"}
		if (i/2)%2 == 1 {
			methods[0], methods[1] = methods[1], methods[0]
		}
		for _, m := range methods {
			time.Sleep(time.Second) // let the last run's source QEMU and swtpm exit
			var s benchSample
			if m == "vtpmctl" {
				s = benchVtpmctl(ctx, t, f, vmv, src, dst)
			} else {
				s = benchVirsh(ctx, t, vmp, src, dst)
			}
			t.Logf("run %d/%d %-7s %s: wall %v, libvirt job %v, downtime %v, host TPM commands src %d dst %d",
				i+1, runs, s.method, s.dir, s.wall.Round(time.Millisecond), s.job.Round(time.Millisecond),
				s.downtime, s.srcTPM, s.dstTPM)
			samples = append(samples, s)
		}
	}
	table := benchTable(samples, runs)
	t.Logf("\n%s", table)
	fmt.Printf("\n%s\n", table)
}

// appendConfig appends lines to a vtpmd.yaml (before 'vtpmd run').
func appendConfig(path, lines string) error {
	fh, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	if _, err := fh.WriteString(lines); err != nil {
		fh.Close()
		return err
	}
	return fh.Close()
}

// createPlainVM defines and starts a VM on the first host that vtpmd does
// not know, with the same ephemeral private secret defined on every host
// given (libvirt runs swtpm_setup at the first start).
func createPlainVM(ctx context.Context, t *testing.T, spec libvirt.VMSpec, name string, on *vhost, others ...*vhost) *guestVM {
	t.Helper()
	vm := &guestVM{name: name, uuid: newUUID()}
	pass := passphrase()
	for _, h := range append([]*vhost{on}, others...) {
		if err := h.Hyp.DefineSecret(ctx, vm.uuid, pass); err != nil {
			t.Fatal(err)
		}
	}
	spec.Name, spec.UUID, spec.SecretUUID, spec.Start = name, vm.uuid, libvirt.SecretUUID(vm.uuid), true
	t0 := time.Now()
	if err := on.Hyp.DefineVM(ctx, spec); err != nil {
		t.Fatal(err)
	}
	t.Logf("VM %s (%s) on %s: secret predefined on %d hosts, libvirt define+start %v", name, vm.uuid, on.Name,
		1+len(others), time.Since(t0).Round(time.Millisecond))
	return vm
}

// benchVtpmctl moves vm with 'vtpmctl migrate' on src's vtpmd, reading
// both daemons' host TPM command counters around it; then checks that dst
// alone owns and runs it.
func benchVtpmctl(ctx context.Context, t *testing.T, f *vfleet, vm *guestVM, src, dst *vhost) benchSample {
	t.Helper()
	s := benchSample{method: "vtpmctl", dir: src.Name + "->" + dst.Name}
	srcBefore, dstBefore := tpmCommands(ctx, t, src), tpmCommands(ctx, t, dst)
	rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	t0 := time.Now()
	r, err := src.d.Ctl(rctx, "migrate", vm.name, "--to", dst.Name)
	s.wall = time.Since(t0)
	if err != nil || r.Code != 0 {
		t.Fatalf("vtpmctl migrate %s --to %s: %v %s", vm.name, dst.Name, err, r)
	}
	s.srcTPM = tpmCommands(ctx, t, src) - srcBefore
	s.dstTPM = tpmCommands(ctx, t, dst) - dstBefore
	s.job, s.downtime = jobStats(ctx, t, dst, vm)
	if owner, report, err := f.owner(ctx, vm); err != nil || owner != dst.Name {
		t.Fatalf("after vtpmctl migrate %s: owner %q, %v\n%s", s.dir, owner, err, report)
	}
	return s
}

// benchVirsh moves vm with the real virsh run in src's namespaces; the
// destination already has the secret. It checks that the VM runs on dst
// only.
func benchVirsh(ctx context.Context, t *testing.T, vm *guestVM, src, dst *vhost) benchSample {
	t.Helper()
	s := benchSample{method: "virsh", dir: src.Name + "->" + dst.Name}
	srcBefore, dstBefore := tpmCommands(ctx, t, src), tpmCommands(ctx, t, dst)
	if has, err := dst.Hyp.HasSecret(ctx, vm.uuid); err != nil || !has {
		t.Fatalf("%s: predefined secret of %s missing: %v", dst.Name, vm.name, err)
	}
	rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd, err := src.NsCommand(rctx, "virsh", "-c", "qemu:///system", "migrate", "--live", "--p2p",
		"--persistent", "--undefinesource", vm.name, "qemu+tcp://"+dst.IP+"/system")
	if err != nil {
		t.Fatal(err)
	}
	cmd.WaitDelay = 5 * time.Second
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	s.wall = time.Since(t0)
	if err != nil {
		t.Fatalf("virsh migrate %s %s: %v\n%s", vm.name, s.dir, err, out)
	}
	// vtpmd takes no part: a count here is background work of the daemons.
	s.srcTPM = tpmCommands(ctx, t, src) - srcBefore
	s.dstTPM = tpmCommands(ctx, t, dst) - dstBefore
	s.job, s.downtime = jobStats(ctx, t, dst, vm)
	for h, want := range map[*vhost]hypervisor.State{src: hypervisor.StateAbsent, dst: hypervisor.StateRunning} {
		d, err := h.Hyp.Domain(ctx, vm.uuid)
		if err != nil || d.State != want {
			t.Fatalf("after virsh migrate %s: %s on %s is %q (%v), want %q", s.dir, vm.name, h.Name, d.State, err, want)
		}
	}
	return s
}

func jobStats(ctx context.Context, t *testing.T, dst *vhost, vm *guestVM) (job, downtime time.Duration) {
	js, err := dst.Hyp.CompletedJobStats(ctx, vm.uuid)
	if err != nil {
		t.Logf("%s: completed job stats of %s: %v", dst.Name, vm.name, err)
		return -1, -1
	}
	return js.Elapsed, js.Downtime
}

// tpmCommands scrapes h's vtpmd metrics (curl inside the host's network
// namespace) and sums vtpmm_tpm_commands_total over all command names.
func tpmCommands(ctx context.Context, t *testing.T, h *vhost) int {
	t.Helper()
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cmd, err := h.NsCommand(rctx, "curl", "-sS", "--max-time", "5", fmt.Sprintf("http://%s:%d/metrics", h.IP, metricsPort))
	if err != nil {
		t.Fatal(err)
	}
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: scrape vtpmd metrics: %v", h.Name, err)
	}
	n, found := 0, false
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		l := sc.Text()
		if !strings.HasPrefix(l, "vtpmm_tpm_commands_total{") {
			continue
		}
		fs := strings.Fields(l)
		v, err := strconv.ParseFloat(fs[len(fs)-1], 64)
		if err != nil {
			t.Fatalf("%s: metrics line %q: %v", h.Name, l, err)
		}
		n += int(v)
		found = true
	}
	if !found {
		t.Fatalf("%s: no vtpmm_tpm_commands_total in the metrics:\n%s", h.Name, tail(string(out), 2000))
	}
	return n
}

func medianDur(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func medianInt(xs []int) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]int(nil), xs...)
	sort.Ints(s)
	if len(s)%2 == 1 {
		return float64(s[len(s)/2])
	}
	return float64(s[len(s)/2-1]+s[len(s)/2]) / 2
}

func minMax(ds []time.Duration) (lo, hi time.Duration) {
	for i, d := range ds {
		if i == 0 || d < lo {
			lo = d
		}
		if i == 0 || d > hi {
			hi = d
		}
	}
	return lo, hi
}

// benchTable renders the medians per method and the ratio.
func benchTable(samples []benchSample, runs int) string {
	type agg struct {
		wall, job, down []time.Duration
		src, dst        []int
	}
	by := map[string]*agg{"vtpmctl": {}, "virsh": {}}
	for _, s := range samples {
		g := by[s.method]
		g.wall = append(g.wall, s.wall)
		if s.job >= 0 {
			g.job = append(g.job, s.job)
			g.down = append(g.down, s.downtime)
		}
		g.src, g.dst = append(g.src, s.srcTPM), append(g.dst, s.dstTPM)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "vtpmm e2e bench: firmware-only KVM VM, 128 MiB, TPM 2.0; %d runs per method, alternating A->B / B->A\n", runs)
	fmt.Fprintf(&b, "| method | median wall | wall min-max | median libvirt job | median downtime | TPM cmds src / dst (median) |\n")
	fmt.Fprintf(&b, "| --- | --- | --- | --- | --- | --- |\n")
	for _, m := range []string{"vtpmctl", "virsh"} {
		g := by[m]
		lo, hi := minMax(g.wall)
		tpm := fmt.Sprintf("%.1f / %.1f", medianInt(g.src), medianInt(g.dst))
		fmt.Fprintf(&b, "| %s | %v | %v-%v | %v | %v | %s |\n", m,
			medianDur(g.wall).Round(time.Millisecond), lo.Round(time.Millisecond), hi.Round(time.Millisecond),
			medianDur(g.job).Round(time.Millisecond), medianDur(g.down), tpm)
	}
	cw, vw := medianDur(by["vtpmctl"].wall), medianDur(by["virsh"].wall)
	if vw > 0 {
		verdict := "within"
		if float64(cw)/float64(vw) > 1.10 {
			verdict = "ABOVE"
		}
		fmt.Fprintf(&b, "ratio vtpmctl/virsh (median wall): %.3f (goal <= 1.10: %s); difference %v\n",
			float64(cw)/float64(vw), verdict, (cw - vw).Round(time.Millisecond))
	}
	return b.String()
}
