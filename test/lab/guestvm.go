package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/test/guest"
)

// Console reads the VM's console log on every host (in fleet order): all
// of them concatenated, and each host's parsed.
func (f *Fleet) Console(vm *VM) (all []byte, per map[string]*guest.Console) {
	per = map[string]*guest.Console{}
	for _, name := range f.Order {
		b, _ := os.ReadFile(f.Hosts[name].Path(vm.Serial))
		all = append(all, b...)
		per[name] = guest.ParseConsole(b)
	}
	return all, per
}

// WaitTicks waits (at most limit) until the console on host h shows at
// least n more unseal ticks than after, and returns the tick count there.
func (f *Fleet) WaitTicks(ctx context.Context, vm *VM, h string, after, n int, limit time.Duration) int {
	f.T.Helper()
	deadline := time.Now().Add(limit)
	for {
		_, per := f.Console(vm)
		c := per[h]
		if len(c.Ticks) >= after+n {
			return len(c.Ticks)
		}
		if ctx.Err() != nil {
			f.T.Fatalf("VM %s on %s: waiting for unseal ticks (%d of %d): %v", vm.Name, h, len(c.Ticks), after+n, ctx.Err())
		}
		if time.Now().After(deadline) {
			all, _ := f.Console(vm)
			f.T.Fatalf("VM %s on %s: %d unseal ticks after %v, want %d; consoles:\n%s", vm.Name, h, len(c.Ticks), limit, after+n, Tail(string(all), 3000))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// VerifyConsole checks the guest's whole history over every host: one
// boot, one sealed secret, every tick unsealed it with PCR 16 unchanged.
// It returns the secret.
func (f *Fleet) VerifyConsole(vm *VM, minTicks int) string {
	f.T.Helper()
	all, _ := f.Console(vm)
	c := guest.ParseConsole(all)
	if err := c.Verify(minTicks); err != nil {
		f.T.Fatalf("guest %s: %v\n%s", vm.Name, err, Tail(string(all), 3000))
	}
	if len(c.Boots) != 1 {
		f.T.Fatalf("guest %s booted %d times, want once", vm.Name, len(c.Boots))
	}
	return c.Secret()
}

// LastTick is the number of c's last unseal tick, or -1.
func LastTick(c *guest.Console) int {
	if len(c.Ticks) == 0 {
		return -1
	}
	return c.Ticks[len(c.Ticks)-1].N
}

// Tail is the last n bytes of s.
func Tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// VMRow is a line of 'vtpmctl vm list'.
type VMRow struct {
	Name, UUID, Gen, State, Pending string
	Owned                           bool
	Note                            string // "-", "DAMAGED: ...", or the rotation note
}

// VMList runs 'vtpmctl vm list' on h's vtpmd: its rows by VM UUID, and
// its output.
func (f *Fleet) VMList(ctx context.Context, h *FleetHost) (map[string]VMRow, string, error) {
	r, err := h.Vtpmd.Ctl(ctx, "vm", "list")
	if err != nil || r.Code != 0 {
		return nil, r.Stdout, fmt.Errorf("%s: vtpmctl vm list: %v %s", h.Name, err, r)
	}
	rows := map[string]VMRow{}
	for i, l := range strings.Split(strings.TrimSpace(r.Stdout), "\n") {
		fs := strings.Fields(l)
		if i == 0 || len(fs) < 7 {
			continue
		}
		rows[fs[1]] = VMRow{Name: fs[0], UUID: fs[1], Owned: fs[2] == "true", Gen: fs[3], State: fs[4], Pending: fs[5],
			Note: strings.Join(fs[6:], " ")}
	}
	return rows, r.Stdout, nil
}

// Owner checks, once, that exactly one host owns the VM's key with no
// pending transaction anywhere, that this host and only this one runs the
// VM, and that only it has the VM's libvirt secret. It returns that host
// and every host's 'vtpmctl vm list'.
func (f *Fleet) Owner(ctx context.Context, vm *VM) (string, string, error) {
	var owners, running []string
	var report strings.Builder
	for _, name := range f.Order {
		h := f.Hosts[name]
		rows, out, err := f.VMList(ctx, h)
		if err != nil {
			return "", "", err
		}
		fmt.Fprintf(&report, "%s:\n%s", name, out)
		row, ok := rows[vm.UUID]
		if ok && row.Pending != "-" {
			return "", report.String(), fmt.Errorf("%s: pending transaction %s", name, row.Pending)
		}
		if ok && row.Owned {
			owners = append(owners, name)
		}
		d, err := h.Hyp.Domain(ctx, vm.UUID)
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
	for _, name := range f.Order {
		if has, err := f.Hosts[name].Hyp.HasSecret(ctx, vm.UUID); err != nil || (has != (name == owners[0])) {
			return "", report.String(), fmt.Errorf("libvirt secret on %s: %v, %v (owner %s)", name, has, err, owners[0])
		}
	}
	if f.Embedded() {
		if err := f.registryAgrees(ctx, f.Hosts[owners[0]], vm, &report); err != nil {
			return "", report.String(), err
		}
	}
	return owners[0], report.String(), nil
}

// FleetVMs runs 'vtpmctl vm list --fleet --json' on h: the registry's
// records.
func (f *Fleet) FleetVMs(ctx context.Context, h *FleetHost) (adminapi.FleetVMs, error) {
	var out adminapi.FleetVMs
	r, err := h.Vtpmd.Ctl(ctx, "vm", "list", "--fleet", "--json")
	if err != nil || r.Code != 0 {
		return out, fmt.Errorf("%s: vtpmctl vm list --fleet: %v %s", h.Name, err, r)
	}
	if err := json.Unmarshal([]byte(r.Stdout), &out); err != nil {
		return out, fmt.Errorf("%s: vtpmctl vm list --fleet --json: %w", h.Name, err)
	}
	return out, nil
}

// registryAgrees checks that the registry shows owner owning vm at the
// generation of its key, with no migration open.
func (f *Fleet) registryAgrees(ctx context.Context, owner *FleetHost, vm *VM, report *strings.Builder) error {
	rows, _, err := f.VMList(ctx, owner)
	if err != nil {
		return err
	}
	list, err := f.FleetVMs(ctx, owner)
	if err != nil {
		return err
	}
	for _, r := range list.VMs {
		if r.UUID != vm.UUID {
			continue
		}
		fmt.Fprintf(report, "registry (revision %d): owner %s, generation %d, migration %q\n", list.Rev, r.Owner, r.Generation, r.TxID)
		if r.Owner != owner.Name || fmt.Sprint(r.Generation) != rows[vm.UUID].Gen || r.TxID != "" || list.Stale {
			return fmt.Errorf("the registry shows %s at generation %d (migration %q, stale %v); %s holds generation %s",
				r.Owner, r.Generation, r.TxID, list.Stale, owner.Name, rows[vm.UUID].Gen)
		}
		return nil
	}
	return fmt.Errorf("the registry has no record of %s", vm.Name)
}

// Migration is what Migrate measured.
type Migration struct {
	Wall   time.Duration
	Stdout string // vtpmctl migrate's progress (one line per phase)
	// Job is libvirt's completed job on the destination (JobErr when it
	// could not be read).
	Job    libvirt.JobStats
	JobErr error
}

// Migrate runs 'vtpmctl migrate VM --to DST' on src's vtpmd and fails the
// test unless it exits 0. It logs the phases, the wall time and libvirt's
// job statistics.
func (f *Fleet) Migrate(ctx context.Context, vm *VM, src, dst *FleetHost) Migration {
	t := f.T
	t.Helper()
	t0 := time.Now()
	r, err := src.Vtpmd.Ctl(ctx, "migrate", vm.Name, "--to", dst.Name)
	m := Migration{Wall: time.Since(t0), Stdout: r.Stdout}
	if err != nil || r.Code != 0 {
		t.Fatalf("vtpmctl migrate %s --to %s: %v %s", vm.Name, dst.Name, err, r)
	}
	msg := fmt.Sprintf("%s %s->%s via vtpmctl migrate: %v", vm.Name, src.Name, dst.Name, m.Wall.Round(time.Millisecond))
	m.Job, m.JobErr = dst.Hyp.CompletedJobStats(ctx, vm.UUID)
	if m.JobErr == nil {
		msg += fmt.Sprintf(" (libvirt job %v, downtime %v, %.1f MiB sent)", m.Job.Elapsed, m.Job.Downtime, float64(m.Job.DataProcessed)/(1<<20))
	}
	t.Logf("%s\n%s", msg, strings.TrimRight(r.Stdout, "\n"))
	return m
}
