//go:build e2e

package e2e_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/test/guest"
	"github.com/vtpmm/vtpmm/test/lab"
)

// The lab's failover settings: replicas at most failoverMaxLag behind
// (the owner checks every third of it), the registry's liveness TTL is
// the lab's 5 s (registryYAML).
const (
	failoverMaxLag       = 3 * time.Second
	failoverFenceTimeout = time.Minute
)

// TestE2EFailover (issue #15) on three lab hosts (registry embedded, TTL
// 5 s; vtpmm's qemu hook installed; every vtpmd's fence command is the
// lab's fence agent, cmd/fence_lab, with '{host}'):
//   - a Linux guest is made on host-a and host-b is made its standby
//     ('vtpmctl vm standby VM --on host-b') while it boots; its domain is
//     defined, shut off, on host-b from host-a's definition (as a cluster's
//     shared domain configuration has every node know it); the guest seals
//     a secret in its vTPM;
//   - host-b's replica catches up with the sealed secret: its state's
//     SHA-256 equals the state file's on host-a, at generation 1 ('vtpmctl
//     vm show' on both logged); every refresh with the standby's evidence
//     warm used 0 host TPM commands on host-a;
//   - host-a loses power (lab.Host.PowerOff: libvirtd, QEMU, vtpmd with
//     its registry member and its host TPM SIGKILLed at once);
//   - with no operator: host-a's lease expires, host-b's vtpmd runs the
//     fence agent for host-a, promotes its replica at generation 2 and
//     starts the domain through libvirt; the guest boots there, finds its
//     sealed secret and unseals it: the same secret; the promotion and the
//     fence are in host-b's audit log;
//   - host-a is powered on (its vtpmd starts as at boot): 'virsh start' of
//     its old copy is refused by the hook, naming the rule, and host-a
//     drops its copy of the key (stale-copy-shredded); host-b still runs
//     the VM, the only host that does;
//   - host-b's vtpmd restarts on what the promotion left (ledger, rollback
//     anchor) and still owns the VM at generation 2.
//
// It logs the failover time split into lease expiry, fencing, promotion
// and start (host-b's vtpmm_failover_phase_seconds; the lease's expiry:
// until the failover began, from host-b's report in its log), and the
// replica refreshes' cost (bytes, host TPM commands on the owner) from
// host-a's log. It asserts no timing.
func TestE2EFailover(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	f, a, b, vm, secret := failoverLab(ctx, t, "linux-f", true, func(agent string) string { return agent })

	// host-a loses power. From here on no operator acts until it returns.
	t0 := time.Now()
	if err := a.PowerOff(); err != nil {
		t.Fatal(err)
	}
	t.Logf("host-a powered off (everything SIGKILLed at once) in %v", time.Since(t0).Round(time.Millisecond))
	var running time.Duration
	for {
		d, err := b.Hyp.Domain(ctx, vm.UUID)
		if err == nil && d.State == hypervisor.StateRunning {
			running = time.Since(t0)
			break
		}
		if time.Since(t0) > 3*time.Minute {
			t.Fatalf("%s on host-b %v after host-a's power-off: %q, %v\n%s", vm.Name, time.Since(t0).Round(time.Second), d.State, err, b.Vtpmd.LogTail(6000))
		}
		time.Sleep(100 * time.Millisecond)
	}
	m := scrape(ctx, t, b)
	phases := m.Family("vtpmm_failover_phase_seconds_sum", "phase")
	fence, promote, start := secs(phases["fence"]), secs(phases["promote"]), secs(phases["start"])
	fos, err := b.Vtpmd.WaitAutomaticFailovers(1, 30*time.Second)
	if err != nil || len(fos) != 1 || fos[0].Began.IsZero() || fos[0].Generation != 2 || !fos[0].Started {
		t.Fatalf("host-b's automatic failovers: %+v, %v, want one at generation 2, started\n%s", fos, err, b.Vtpmd.LogTail(6000))
	}
	lease := fos[0].Began.Sub(t0)
	rest := running - lease - fence - promote - start
	t.Logf("failover on the lab (TCG, registry TTL 5 s, 2 loaded cores): host-a's power-off to %s running on host-b: %v = lease expiry and detection %v (until host-b's vtpmd began the failover) + fence agent %v + promotion %v + start (secret, libvirt start through the qemu hook) %v + the rest (opening the replica in host-b's TPM, registry reads, this test's 100 ms polling) %v; vtpmm's share on top of lease expiry and fencing (promotion + start + the rest) %v",
		vm.Name, running.Round(time.Millisecond), lease.Round(time.Millisecond), fence.Round(time.Millisecond), promote.Round(time.Millisecond),
		start.Round(time.Millisecond), rest.Round(time.Millisecond), (promote + start + rest).Round(time.Millisecond))
	t.Logf("host-b: vtpmm_failovers_total %v, vtpmm_promotions_total %v", m.Family("vtpmm_failovers_total", "result"), sumFamily(m, "vtpmm_promotions_total"))
	for _, l := range logLines(b, "fence agent: host fenced", "failover: replica promoted; this host owns the VM", "automatic failover done") {
		t.Logf("host-b vtpmd: %s", l)
	}
	for _, l := range logLines(b, "rollback anchor: the step stays unsettled until the next start") {
		t.Errorf("host-b's rollback anchor step did not settle: %s", l)
	}

	tookOver(ctx, t, f, vm, b, secret, t0)
	oldOwnerReturns(ctx, t, f, vm, a, b, func() error { return a.PowerOn(ctx) })
	// host-b's vtpmd starts again on what the promotion left (its ledger
	// and rollback anchor account for the promoted key).
	if err := b.Vtpmd.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := b.Vtpmd.Start(ctx); err != nil {
		t.Fatalf("host-b's vtpmd after the promotion: %v", err)
	}
	if rows, out, err := f.VMList(ctx, b); err != nil || !rows[vm.UUID].Owned || rows[vm.UUID].Gen != "2" {
		t.Errorf("host-b after its vtpmd restarted: %+v, %v\n%s", rows[vm.UUID], err, out)
	}
}

// failoverLab brings up the failover lab (three hosts, registry embedded,
// hook mode, metrics; every vtpmd's fence command is fence(agent), agent
// the lab's fence agent built into the lab's directory), makes a Linux
// guest named name on host-a with standby host-b (with defineOnStandby its
// domain is defined on host-b from host-a's, as a cluster's shared
// configuration would; without, host-b's vtpmd defines it at the promotion
// from the description host-a sends with the replica), waits until the
// guest sealed its secret and host-b's replica holds it, and logs 'vm
// show' and the refreshes.
func failoverLab(ctx context.Context, t *testing.T, name string, defineOnStandby bool, fence func(agent string) string) (*lab.Fleet, *lab.FleetHost, *lab.FleetHost, *lab.VM, string) {
	t.Helper()
	img := guestImage(ctx, t)
	requireLab(t)
	f := lab.NewFleet(ctx, t, lab.FleetConfig{Network: lab.NetworkConfig{Prefix: "ve2e", Keep: os.Getenv("VTPMM_E2E_KEEP") == "1"},
		Tools: sharedTools(ctx, t), GoodLog: goodLog, Hosts: []lab.HostSpec{hostA(), hostB(), hostCGood()}, Log: logger(t),
		HookMode: true, Registry: "embedded"})
	f.AddHosts(ctx)
	agent, err := lab.BuildFenceAgent(ctx, f.Net.Dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range f.Order {
		h := f.Hosts[n]
		if err := h.Vtpmd.AppendConfig(f.Net.StandbyYAML(fence(agent), failoverMaxLag, failoverFenceTimeout)); err != nil {
			t.Fatal(err)
		}
		if err := h.Vtpmd.EnableMetrics(); err != nil {
			t.Fatal(err)
		}
	}
	f.Start(ctx)
	a, b := f.Hosts["host-a"], f.Hosts["host-b"]
	vm := f.CreateVM(ctx, a, name, lab.LinuxSpec(img))
	if defineOnStandby {
		if err := b.DefineFrom(ctx, a, vm); err != nil {
			t.Fatal(err)
		}
	}
	if r, err := a.Vtpmd.Ctl(ctx, "vm", "standby", vm.Name, "--on", "host-b"); err != nil || r.Code != 0 {
		t.Fatalf("vtpmctl vm standby %s --on host-b: %v %s", vm.Name, err, r)
	} else {
		t.Logf("vtpmctl vm standby %s --on host-b:\n%s", vm.Name, r.Stdout)
	}
	f.WaitTicks(ctx, vm, a.Name, 0, 2, 4*time.Minute)
	secret := f.VerifyConsole(vm, 2)
	t.Logf("guest sealed %s on host-a", secret)

	// host-b's replica catches up with the sealed secret.
	waitFreshReplica(ctx, t, a, b, vm, 2*time.Minute)
	for _, h := range []*lab.FleetHost{a, b} {
		r, _ := h.Vtpmd.Ctl(ctx, "vm", "show", vm.Name)
		t.Logf("vtpmctl vm show %s on %s:\n%s", vm.Name, h.Name, r.Stdout)
	}
	logRefreshes(t, a)
	return f, a, b, vm, secret
}

// waitFreshReplica waits until standby holds a replica of vm at the
// owner's generation whose state is the owner's state file now.
func waitFreshReplica(ctx context.Context, t *testing.T, owner, standby *lab.FleetHost, vm *lab.VM, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		r, rerr := standby.Replica(vm)
		sum, serr := owner.VTPMStateSHA256(vm)
		if rerr == nil && serr == nil && r != nil && r.Request.Generation == vm.Generation && bytes.Equal(r.Request.StateSHA256, sum) {
			t.Logf("%s holds a fresh replica of %s: generation %d, %d B of state, received %v ago", standby.Name, vm.Name,
				r.Request.Generation, len(r.Request.State), time.Since(r.Received).Round(time.Millisecond))
			return
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			t.Fatalf("%s: no fresh replica of %s after %v: %+v %v %v\n%s", standby.Name, vm.Name, limit, r != nil, rerr, serr, owner.Vtpmd.LogTail(4000))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// logRefreshes logs the owner's replica refreshes (vtpmd's debug log:
// bytes sent, evidence warm, host TPM commands on the owner) and fails
// the test if a refresh with warm evidence used a host TPM command
// (issue 15's budget: 0).
func logRefreshes(t *testing.T, owner *lab.FleetHost) {
	t.Helper()
	n := 0
	for _, l := range logLines(owner, "standby replica refreshed") {
		var e struct {
			Bytes int  `json:"bytes"`
			Warm  bool `json:"warm"`
			TPM   int  `json:"tpm_commands"`
		}
		if json.Unmarshal([]byte(l), &e) != nil {
			continue
		}
		n++
		t.Logf("replica refresh %d on %s: %d B, evidence warm %v, %d host TPM commands on the owner", n, owner.Name, e.Bytes, e.Warm, e.TPM)
		if e.Warm && e.TPM != 0 {
			t.Errorf("a replica refresh with warm evidence used %d host TPM commands on the owner, want 0", e.TPM)
		}
	}
	if n == 0 {
		t.Errorf("%s's log shows no replica refresh", owner.Name)
	}
}

// logLines returns the lines of h's vtpmd log whose message is one of msgs.
func logLines(h *lab.FleetHost, msgs ...string) []string {
	b, err := os.ReadFile(filepath.Clean(h.Vtpmd.LogPath))
	if err != nil {
		return nil
	}
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var e struct {
			Msg string `json:"msg"`
		}
		if json.Unmarshal(sc.Bytes(), &e) != nil {
			continue
		}
		for _, m := range msgs {
			if e.Msg == m {
				out = append(out, sc.Text())
			}
		}
	}
	return out
}

func secs(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

func sumFamily(m lab.Metrics, name string) float64 {
	v := 0.0
	for series, x := range m {
		if series == name || strings.HasPrefix(series, name+"{") {
			v += x
		}
	}
	return v
}

// tookOver checks that the guest boots on b, the VM's new owner, finds the
// secret it sealed before and unseals it, that b owns the VM at generation
// 2, and that b's audit log has the fence and the promotion (t0: when the
// old owner failed).
func tookOver(ctx context.Context, t *testing.T, f *lab.Fleet, vm *lab.VM, b *lab.FleetHost, secret string, t0 time.Time) {
	t.Helper()
	f.WaitTicks(ctx, vm, b.Name, 0, 2, 4*time.Minute)
	served := time.Since(t0)
	raw, _ := os.ReadFile(b.Path(vm.Serial))
	c := guest.ParseConsole(raw)
	if len(c.Sealed) != 0 || len(c.Found) != 1 || c.Found[0] != secret || len(c.Errors) != 0 {
		t.Fatalf("guest on %s: sealed %v, found %v, errors %v; want the secret %s found\n%s", b.Name, c.Sealed, c.Found, c.Errors, secret, lab.Tail(string(raw), 2000))
	}
	for _, tk := range c.Ticks {
		if tk.Secret != secret || tk.PCR16 != guest.ExpectedPCR16() {
			t.Fatalf("guest on %s: tick %+v, want secret %s", b.Name, tk, secret)
		}
	}
	t.Logf("guest on %s found its secret %s and unsealed it %d times; its second unseal %v after the owner failed (guest boot under TCG included)",
		b.Name, secret, len(c.Ticks), served.Round(time.Second))
	rows, out, err := f.VMList(ctx, b)
	if err != nil || !rows[vm.UUID].Owned || rows[vm.UUID].Gen != "2" {
		t.Errorf("%s after the failover: %+v, %v, want owned at generation 2\n%s", b.Name, rows[vm.UUID], err, out)
	}
	bc := adminapi.NewClient(b.Vtpmd.Socket)
	for _, ev := range []string{"host-fenced", "failover-promoted"} {
		log, err := bc.Audit(ctx, vm.UUID, ev)
		if err != nil || len(log.Records) == 0 {
			t.Errorf("%s's audit log: no %s record for %s: %v", b.Name, ev, vm.Name, err)
			continue
		}
		r := log.Records[len(log.Records)-1]
		t.Logf("%s audit: %s peer %s generation %d: %s", b.Name, r.Event, r.Peer, r.Generation, r.Detail)
	}
}

// oldOwnerReturns brings the old owner a back (back), then checks that
// 'virsh start' of its old copy is refused by the hook naming the rule,
// that it shreds its copy once b confirms, and that b alone runs the VM.
func oldOwnerReturns(ctx context.Context, t *testing.T, f *lab.Fleet, vm *lab.VM, a, b *lab.FleetHost, back func() error) {
	t.Helper()
	t1 := time.Now()
	if err := back(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s back, vtpmd serving, in %v", a.Name, time.Since(t1).Round(time.Millisecond))
	out, _, err := a.Virsh(ctx, "start", vm.Name)
	if err == nil {
		t.Fatalf("%s started its old copy of %s after the failover", a.Name, vm.Name)
	}
	if !strings.Contains(out, "rule ") {
		t.Errorf("%s's refusal does not name its rule: %s", a.Name, out)
	}
	t.Logf("%s refuses its old copy: %s", a.Name, strings.TrimSpace(out))
	ac := adminapi.NewClient(a.Vtpmd.Socket)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		rows, out, err := f.VMList(ctx, a)
		if err == nil && !rows[vm.UUID].Owned {
			log, aerr := ac.Audit(ctx, vm.UUID, "stale-copy-shredded")
			if aerr == nil && len(log.Records) > 0 {
				t.Logf("%s dropped its copy: %s", a.Name, log.Records[len(log.Records)-1].Detail)
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still holds its old copy of %s 2 min after it returned: %+v %v\n%s\n%s", a.Name, vm.Name, rows[vm.UUID], err, out, a.Vtpmd.LogTail(4000))
		}
		time.Sleep(time.Second)
	}
	if log, err := ac.Audit(ctx, vm.UUID, "start-refused"); err == nil && len(log.Records) > 0 {
		t.Logf("%s audit: start-refused: %s", a.Name, log.Records[len(log.Records)-1].Detail)
	}
	if d, err := a.Hyp.Domain(ctx, vm.UUID); err != nil || d.State == hypervisor.StateRunning {
		t.Errorf("%s on %s after it returned: %q, %v; want not running", vm.Name, a.Name, d.State, err)
	}
	if d, err := b.Hyp.Domain(ctx, vm.UUID); err != nil || d.State != hypervisor.StateRunning {
		t.Errorf("%s on %s after %s returned: %q, %v", vm.Name, b.Name, a.Name, d.State, err)
	}
}
