//go:build e2e

package e2e_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	vtpmdagent "github.com/vtpmm/vtpmm/internal/agent"
	"github.com/vtpmm/vtpmm/test/e2e"
	"github.com/vtpmm/vtpmm/test/guest"
)

// vhost is an e2e host with its real vtpmd.
type vhost struct {
	*e2e.Host
	d *e2e.Vtpmd
}

// vfleet is a set of e2e hosts, each running the real vtpmd binary in its
// namespaces, provisioned with the real CLIs as an operator would:
// vtpmctl pki init/issue, vtpmctl eventlog golden, vtpmd init, vtpmd run,
// vtpmctl host enroll.
type vfleet struct {
	t     *testing.T
	net   *e2e.Network
	tools e2e.Tools
	hosts map[string]*vhost
	order []string
}

type hostSpec struct{ name, ip, bootLog string }

func newVFleet(ctx context.Context, t *testing.T, specs ...hostSpec) *vfleet {
	t.Helper()
	n := e2e.NewNetwork(ctx, t)
	f := &vfleet{t: t, net: n, tools: sharedTools(ctx, t), hosts: map[string]*vhost{}}
	pkiDir, rootsDir := filepath.Join(n.Dir, "pki"), filepath.Join(n.Dir, "ek-roots")
	policy := filepath.Join(n.Dir, "policy.yaml")
	f.ctl(ctx, "pki", "init", "--dir", pkiDir)
	peers := map[string]string{}
	for _, s := range specs {
		f.ctl(ctx, "pki", "issue", s.name, "--dir", pkiDir, "--ip", s.ip)
		peers[s.name] = s.ip
	}
	r := f.ctl(ctx, "eventlog", "golden", goodLog, "--pcrs", "0,1,2,3,4,5,6,7,8,9")
	if err := os.WriteFile(policy, []byte(r.Stdout), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(rootsDir, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, s := range specs {
		t0 := time.Now()
		h := e2e.NewHost(ctx, t, e2e.HostConfig{Network: n, Name: s.name, IP: s.ip, BootLog: s.bootLog, Log: logger(t)})
		for _, p := range []string{h.Emu.RootCAPath(), h.Emu.IntermediateCAPath()} {
			b := readFile(t, p)
			if err := os.WriteFile(filepath.Join(rootsDir, s.name+"-"+filepath.Base(p)), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		d := e2e.NewVtpmd(ctx, t, h, e2e.VtpmdConfig{Tools: f.tools, PKIDir: pkiDir, Policy: policy,
			RootsDir: rootsDir, Peers: peers, BootLog: s.bootLog})
		f.hosts[s.name] = &vhost{Host: h, d: d}
		f.order = append(f.order, s.name)
		t.Logf("host %s up with vtpmd initialised in %v", s.name, time.Since(t0).Round(time.Millisecond))
	}
	return f
}

// ctl runs vtpmctl and fails the test unless it exits 0.
func (f *vfleet) ctl(ctx context.Context, args ...string) e2e.Result {
	f.t.Helper()
	r, err := f.tools.Ctl(ctx, args...)
	if err != nil || r.Code != 0 {
		f.t.Fatalf("vtpmctl %s: %v %s", strings.Join(args, " "), err, r)
	}
	return r
}

// start runs every host's vtpmd and has every host enrol every other one.
func (f *vfleet) start(ctx context.Context) {
	f.t.Helper()
	for _, name := range f.order {
		t0 := time.Now()
		if err := f.hosts[name].d.Start(ctx); err != nil {
			f.t.Fatal(err)
		}
		f.t.Logf("vtpmd on %s serving after %v", name, time.Since(t0).Round(time.Millisecond))
	}
	for _, name := range f.order {
		for _, other := range f.order {
			if other == name {
				continue
			}
			r, err := f.hosts[name].d.Ctl(ctx, "host", "enroll", other)
			if err != nil || r.Code != 0 {
				f.t.Fatalf("%s: vtpmctl host enroll %s: %v %s", name, other, err, r)
			}
		}
	}
}

// guestVM is a VM created by vtpmd and run by libvirt.
type guestVM struct {
	name, uuid string
	serial     string // console log path as libvirtd sees it (each host has its own file there)
	linux      bool
}

// createVM makes a VM on h before h's vtpmd runs, the way this suite
// defines it (docs/libvirt.md, "vtpmd e2e"):
//   - 'vtpmd vm create NAME --uuid U' makes the VM key (generation 1) and an
//     encrypted swtpm state with EK certificates in DATA/vms/U/tpm2;
//   - that state is copied to libvirt's /var/lib/libvirt/swtpm/U/tpm2, so
//     libvirt starts swtpm on it and does not run swtpm_setup;
//   - the test process opens the host's vault (agent.Open, the host TPM
//     is free because vtpmd is not running yet), takes the VM key's
//     passphrase, defines it as the ephemeral private libvirt secret, and
//     wipes it; no key is written anywhere;
//   - the domain is defined and started.
func (f *vfleet) createVM(ctx context.Context, h *vhost, name string, spec libvirt.VMSpec) *guestVM {
	t := f.t
	t.Helper()
	if h.d.Running() {
		t.Fatalf("createVM on %s: vtpmd holds the host TPM", h.Name)
	}
	vm := &guestVM{name: name, uuid: newUUID(), linux: spec.Kernel != ""}
	t0 := time.Now()
	if r, err := h.d.Run(ctx, "vm", "create", name, "--uuid", vm.uuid); err != nil || r.Code != 0 {
		t.Fatalf("vtpmd vm create %s: %v %s", name, err, r)
	}
	created := time.Since(t0)
	if orDefault(spec.TPMVersion, "2.0") == "2.0" {
		// vtpmd makes TPM 2.0 state only; for a TPM 1.2 vTPM (libvirt's
		// swtpm/U/tpm1.2) libvirt runs swtpm_setup itself at the first
		// start, with the same secret.
		src := filepath.Join(h.d.DataDir, "vms", vm.uuid, "tpm2")
		dst := h.Path(filepath.Join("/var/lib/libvirt/swtpm", vm.uuid, "tpm2"))
		if err := copyDir(src, dst); err != nil {
			t.Fatal(err)
		}
	}
	cfg, err := vtpmdagent.LoadConfig(h.d.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	a, err := vtpmdagent.Open(ctx, cfg, vtpmdagent.Options{})
	if err != nil {
		t.Fatal(err)
	}
	k, gen, err := a.Keys().Get(ctx, vm.uuid)
	if cerr := a.Close(ctx); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	pass := k.Passphrase()
	k.Destroy()
	err = h.Hyp.DefineSecret(ctx, vm.uuid, pass)
	for i := range pass {
		pass[i] = 0
	}
	if err != nil {
		t.Fatal(err)
	}
	spec.Name, spec.UUID, spec.SecretUUID, spec.Start = name, vm.uuid, libvirt.SecretUUID(vm.uuid), true
	if vm.linux {
		vm.serial = "/var/log/libvirt/qemu/" + name + "-serial.log"
		spec.SerialLog = vm.serial
	}
	t1 := time.Now()
	if err := h.Hyp.DefineVM(ctx, spec); err != nil {
		t.Fatal(err)
	}
	t.Logf("VM %s (%s, TPM %s) on %s: vtpmd vm create %v (generation %d), libvirt define+start %v",
		name, vm.uuid, orDefault(spec.TPMVersion, "2.0"), h.Name, created.Round(time.Millisecond), gen, time.Since(t1).Round(time.Millisecond))
	return vm
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

func copyDir(src, dst string) error {
	if err := os.MkdirAll(dst, 0o700); err != nil {
		return err
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if !e.Type().IsRegular() || e.Name() == ".lock" {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// guestImage builds the Linux guest (cached in guest.DefaultDir()).
func guestImage(ctx context.Context, t *testing.T) *guest.Image {
	t.Helper()
	root, err := e2e.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	img, err := guest.Build(ctx, guest.Config{Dir: guest.DefaultDir(), ModuleDir: root})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest image ready in %v", time.Since(t0).Round(time.Millisecond))
	return img
}

func linuxSpec(img *guest.Image) libvirt.VMSpec {
	return libvirt.VMSpec{MemoryMiB: 256, TCG: true, Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: guest.Cmdline, TPMVersion: "2.0"}
}

// console reads the VM's console log on every host (in fleet order).
func (f *vfleet) console(vm *guestVM) (all []byte, per map[string]*guest.Console) {
	per = map[string]*guest.Console{}
	for _, name := range f.order {
		b, _ := os.ReadFile(f.hosts[name].Path(vm.serial))
		all = append(all, b...)
		per[name] = guest.ParseConsole(b)
	}
	return all, per
}

// waitTicks waits (bounded) until the console on h shows at least n more
// unseal ticks than `after`, and returns the tick count there.
func (f *vfleet) waitTicks(ctx context.Context, vm *guestVM, h string, after, n int, limit time.Duration) int {
	f.t.Helper()
	deadline := time.Now().Add(limit)
	for {
		_, per := f.console(vm)
		c := per[h]
		if len(c.Ticks) >= after+n {
			return len(c.Ticks)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			all, _ := f.console(vm)
			f.t.Fatalf("VM %s on %s: %d unseal ticks after %v, want %d; consoles:\n%s", vm.name, h, len(c.Ticks), limit, after+n, tail(string(all), 3000))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// verifyConsole checks the guest's whole history over every host: one
// boot, one sealed secret, every tick unsealed it with PCR 16 unchanged.
func (f *vfleet) verifyConsole(vm *guestVM, minTicks int) string {
	f.t.Helper()
	all, _ := f.console(vm)
	c := guest.ParseConsole(all)
	if err := c.Verify(minTicks); err != nil {
		f.t.Fatalf("guest %s: %v\n%s", vm.name, err, tail(string(all), 3000))
	}
	if len(c.Boots) != 1 {
		f.t.Fatalf("guest %s booted %d times, want once", vm.name, len(c.Boots))
	}
	return c.Secret()
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// vmRow is a line of 'vtpmctl vm list'.
type vmRow struct {
	name, uuid, gen, state, pending string
	owned                           bool
}

func (f *vfleet) vmList(ctx context.Context, h *vhost) (map[string]vmRow, string, error) {
	r, err := h.d.Ctl(ctx, "vm", "list")
	if err != nil || r.Code != 0 {
		return nil, r.Stdout, fmt.Errorf("%s: vtpmctl vm list: %v %s", h.Name, err, r)
	}
	rows := map[string]vmRow{}
	for i, l := range strings.Split(strings.TrimSpace(r.Stdout), "\n") {
		fs := strings.Fields(l)
		if i == 0 || len(fs) != 6 {
			continue
		}
		rows[fs[1]] = vmRow{name: fs[0], uuid: fs[1], owned: fs[2] == "true", gen: fs[3], state: fs[4], pending: fs[5]}
	}
	return rows, r.Stdout, nil
}

// owner checks, once, that exactly one host owns the VM's key with no
// pending transaction anywhere, and that this host and only this one runs
// the VM. It returns that host.
func (f *vfleet) owner(ctx context.Context, vm *guestVM) (string, string, error) {
	var owners, running []string
	var report strings.Builder
	for _, name := range f.order {
		h := f.hosts[name]
		rows, out, err := f.vmList(ctx, h)
		if err != nil {
			return "", "", err
		}
		fmt.Fprintf(&report, "%s:\n%s", name, out)
		row, ok := rows[vm.uuid]
		if ok && row.pending != "-" {
			return "", report.String(), fmt.Errorf("%s: pending transaction %s", name, row.pending)
		}
		if ok && row.owned {
			owners = append(owners, name)
		}
		d, err := h.Hyp.Domain(ctx, vm.uuid)
		if err != nil {
			return "", report.String(), err
		}
		if d.State == hypervisor.StateRunning {
			running = append(running, name)
		}
	}
	if len(owners) != 1 || len(running) != 1 || owners[0] != running[0] {
		return "", report.String(), fmt.Errorf("owners %v, running on %v", owners, running)
	}
	// The VM key's libvirt secret exists only where the VM runs.
	for _, name := range f.order {
		if has, err := f.hosts[name].Hyp.HasSecret(ctx, vm.uuid); err != nil || (has != (name == owners[0])) {
			return "", report.String(), fmt.Errorf("libvirt secret on %s: %v, %v (owner %s)", name, has, err, owners[0])
		}
	}
	return owners[0], report.String(), nil
}

// migrate runs 'vtpmctl migrate' on src's vtpmd and expects exit 0. It
// logs the phases, the wall time and libvirt's job statistics.
func (f *vfleet) migrate(ctx context.Context, vm *guestVM, src, dst *vhost) time.Duration {
	t := f.t
	t.Helper()
	t0 := time.Now()
	r, err := src.d.Ctl(ctx, "migrate", vm.name, "--to", dst.Name)
	wall := time.Since(t0)
	if err != nil || r.Code != 0 {
		t.Fatalf("vtpmctl migrate %s --to %s: %v %s", vm.name, dst.Name, err, r)
	}
	msg := fmt.Sprintf("%s %s->%s via vtpmctl migrate: %v", vm.name, src.Name, dst.Name, wall.Round(time.Millisecond))
	if js, err := dst.Hyp.CompletedJobStats(ctx, vm.uuid); err == nil {
		msg += fmt.Sprintf(" (libvirt job %v, downtime %v, %.1f MiB sent)", js.Elapsed, js.Downtime, float64(js.DataProcessed)/(1<<20))
	}
	t.Logf("%s\n%s", msg, strings.TrimRight(r.Stdout, "\n"))
	return wall
}

// TestVtpmdMigrateLinuxGuestABA: a Linux guest (TCG, TPM 2.0) seals a
// secret in its vTPM on host-a; the real vtpmd daemons move it
// A->B->A through 'vtpmctl migrate'. After each hop the guest keeps
// unsealing the same secret with PCR 16 unchanged on the new host (no
// reboot: its tick counter continues), exactly one host owns the key and
// runs the VM, and the generation went up by one.
func TestVtpmdMigrateLinuxGuestABA(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	img := guestImage(ctx, t)
	f := newVFleet(ctx, t, hostSpec{"host-a", "10.251.0.1", goodLog}, hostSpec{"host-b", "10.251.0.2", goodLog})
	a, b := f.hosts["host-a"], f.hosts["host-b"]
	vm := f.createVM(ctx, a, "linux-1", linuxSpec(img))
	f.start(ctx)
	t0 := time.Now()
	ticks := f.waitTicks(ctx, vm, a.Name, 0, 2, 3*time.Minute)
	t.Logf("guest sealed its secret and unsealed it %d times after %v", ticks, time.Since(t0).Round(time.Millisecond))
	secret := f.verifyConsole(vm, 2)

	gen := 1
	for i, hop := range []struct{ src, dst *vhost }{{a, b}, {b, a}} {
		_, per := f.console(vm)
		before := len(per[hop.dst.Name].Ticks)
		lastN := lastTick(per[hop.src.Name])
		f.migrate(ctx, vm, hop.src, hop.dst)
		f.waitTicks(ctx, vm, hop.dst.Name, before, 3, time.Minute)
		if s := f.verifyConsole(vm, 2); s != secret {
			t.Fatalf("hop %d: secret %s, sealed %s", i+1, s, secret)
		}
		_, per = f.console(vm)
		if first := per[hop.dst.Name].Ticks[before].N; first <= lastN {
			t.Errorf("hop %d: first tick on %s is %d, last on %s was %d: the guest restarted", i+1, hop.dst.Name, first, hop.src.Name, lastN)
		}
		owner, report, err := f.owner(ctx, vm)
		if err != nil || owner != hop.dst.Name {
			t.Fatalf("hop %d: owner %q, %v\n%s", i+1, owner, err, report)
		}
		gen++
		rows, _, _ := f.vmList(ctx, hop.dst)
		if g := rows[vm.uuid].gen; g != fmt.Sprint(gen) {
			t.Errorf("hop %d: generation %s on %s, want %d", i+1, g, hop.dst.Name, gen)
		}
	}
	_, per := f.console(vm)
	t.Logf("guest unsealed its secret %d times on host-a and %d on host-b", len(per["host-a"].Ticks), len(per["host-b"].Ticks))
}

func lastTick(c *guest.Console) int {
	if len(c.Ticks) == 0 {
		return -1
	}
	return c.Ticks[len(c.Ticks)-1].N
}

// TestVtpmdMigrateTPM12 moves a firmware-only VM with a TPM 1.2 vTPM
// (tpm-tis) A->B through 'vtpmctl migrate'.
func TestVtpmdMigrateTPM12(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	f := newVFleet(ctx, t, hostSpec{"host-a", "10.251.0.1", goodLog}, hostSpec{"host-b", "10.251.0.2", goodLog})
	a, b := f.hosts["host-a"], f.hosts["host-b"]
	vm := f.createVM(ctx, a, "tpm12-1", libvirt.VMSpec{TCG: !e2e.KVM(), TPMVersion: "1.2"})
	f.start(ctx)
	f.migrate(ctx, vm, a, b)
	owner, report, err := f.owner(ctx, vm)
	if err != nil || owner != b.Name {
		t.Fatalf("owner %q, %v\n%s", owner, err, report)
	}
	// libvirt ran a TPM 1.2 swtpm on the destination (state in swtpm/U/tpm1.2).
	if ents, err := os.ReadDir(b.Path(filepath.Join("/var/lib/libvirt/swtpm", vm.uuid, "tpm1.2"))); err != nil || len(ents) == 0 {
		t.Errorf("TPM 1.2 state on host-b: %d files, %v", len(ents), err)
	}
}

// TestVtpmdKilledMidMigration SIGKILLs one side's vtpmd right after
// 'vtpmctl migrate' printed a phase, restarts it (like vtpmd.service's
// Restart=on-failure, RestartSec=2s), and waits until both hosts agree:
// exactly one owner, no pending transaction, the owner runs the VM, and
// the guest keeps unsealing its secret wherever it runs.
func TestVtpmdKilledMidMigration(t *testing.T) {
	for _, tc := range []struct {
		victim string // source or destination
		phase  string
	}{
		{"source", "prepare"},
		{"source", "hypervisor"},
		{"destination", "prepare"},
		{"destination", "hypervisor"},
	} {
		t.Run(tc.victim+"@"+tc.phase, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			img := guestImage(ctx, t)
			f := newVFleet(ctx, t, hostSpec{"host-a", "10.251.0.1", goodLog}, hostSpec{"host-b", "10.251.0.2", goodLog})
			a, b := f.hosts["host-a"], f.hosts["host-b"]
			vm := f.createVM(ctx, a, "linux-k", linuxSpec(img))
			f.start(ctx)
			f.waitTicks(ctx, vm, a.Name, 0, 2, 3*time.Minute)
			secret := f.verifyConsole(vm, 2)
			victim := a
			if tc.victim == "destination" {
				victim = b
			}

			t0 := time.Now()
			cmd := a.d.CtlCmd(ctx, "migrate", vm.name, "--to", b.Name)
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			var stderr strings.Builder
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			killed := false
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				line := sc.Text()
				t.Logf("vtpmctl migrate: %s", line)
				if fs := strings.Fields(line); !killed && len(fs) >= 2 && fs[1] == tc.phase {
					if err := victim.d.Kill(); err != nil {
						t.Fatal(err)
					}
					killed = true
					t.Logf("SIGKILLed vtpmd on %s (%s) %v after the migration started", victim.Name, tc.victim, time.Since(t0).Round(time.Millisecond))
				}
			}
			_, _ = io.Copy(io.Discard, out)
			err = cmd.Wait()
			var ee *exec.ExitError
			code := 0
			if errors.As(err, &ee) {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			t.Logf("vtpmctl migrate exited %d after %v: %s", code, time.Since(t0).Round(time.Millisecond), strings.TrimSpace(stderr.String()))
			if !killed {
				t.Fatalf("vtpmctl migrate never printed phase %q", tc.phase)
			}

			time.Sleep(2 * time.Second) // vtpmd.service: RestartSec=2s
			if err := victim.d.Start(ctx); err != nil {
				t.Fatal(err)
			}
			t.Logf("vtpmd on %s restarted %v after the migration started", victim.Name, time.Since(t0).Round(time.Millisecond))

			// Recovery: Reconcile at start, then every 15 s while open.
			deadline := time.Now().Add(90 * time.Second)
			var owner, report string
			for {
				owner, report, err = f.owner(ctx, vm)
				if err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("no single owner 90 s after the restart: %v\n%s", err, report)
				}
				time.Sleep(time.Second)
			}
			t.Logf("resolved %v after the migration started: %s owns and runs the VM\n%s", time.Since(t0).Round(time.Millisecond), owner, report)
			_, per := f.console(vm)
			f.waitTicks(ctx, vm, owner, len(per[owner].Ticks), 3, time.Minute)
			if s := f.verifyConsole(vm, 2); s != secret {
				t.Fatalf("secret %s, sealed %s", s, secret)
			}
			// Both audit chains verify.
			for _, h := range []*vhost{a, b} {
				if r, err := h.d.Ctl(ctx, "audit"); err != nil || r.Code != 0 {
					t.Errorf("%s: vtpmctl audit: %v %s", h.Name, err, r)
				}
			}
		})
	}
}

// TestVtpmdRecoveryTickDuringMigration starts a migration so that the
// source vtpmd's recovery loop (every 15 s while a transaction is open)
// ticks during libvirt's live migration. It must not touch the
// transaction the daemon itself is driving. Before the fix (Node.drive),
// Reconcile saw the VM still running on the source, aborted, and libvirt
// then completed the migration: the VM ran on the destination while the
// source kept its key. The unit test TestReconcileDuringOwnMigration
// covers the same in package migrate.
func TestVtpmdRecoveryTickDuringMigration(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	img := guestImage(ctx, t)
	f := newVFleet(ctx, t, hostSpec{"host-a", "10.251.0.1", goodLog}, hostSpec{"host-b", "10.251.0.2", goodLog})
	a, b := f.hosts["host-a"], f.hosts["host-b"]
	vm := f.createVM(ctx, a, "linux-t", linuxSpec(img))
	f.start(ctx)
	f.waitTicks(ctx, vm, a.Name, 0, 2, 3*time.Minute)
	// Start 300 ms before the source's next tick: the tick then lands in
	// the hypervisor phase (libvirt needs about 2 s for this guest).
	tick := a.d.NextRecoveryTick(time.Now().Add(time.Second))
	time.Sleep(time.Until(tick.Add(-300 * time.Millisecond)))
	r, err := a.d.Ctl(ctx, "migrate", vm.name, "--to", b.Name)
	t.Logf("vtpmctl migrate with a recovery tick inside: %v %s", err, r)
	owner, report, oerr := f.owner(ctx, vm)
	if err != nil || r.Code != 0 || oerr != nil || owner != b.Name {
		t.Fatalf("migration across a recovery tick: exit %d, owner %q (%v)\n%s", r.Code, owner, oerr, report)
	}
}
