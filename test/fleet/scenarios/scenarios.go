// Package scenarios owns the migration scenarios written once against the
// test fleet contract (test/fleet): cold, warm, refused, crash (vtpmd
// killed on the source or the destination during a phase) and hook mode.
// test/fleet/inproc runs them under plain go test, test/e2e on the libvirt
// lab (-tags e2e).
package scenarios

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/errclass"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/test/fleet"
)

// The migration scenarios, written once for every Fleet. Each creates its
// own VM and removes it at the end. Cold must come first on a fleet (or
// after host-a's vtpmd restarted): it asserts a cold attestation.

// Run runs every scenario on f as subtests: cold, warm, refused, crash
// (source and destination, during prepare and during the hypervisor's
// migration), on a fleet in hook mode, hook mode, and with the registry
// embedded in the hosts, the registry's quorum.
func Run(t *testing.T, f fleet.Fleet) {
	t.Run("cold", func(t *testing.T) { Cold(t, f) })
	t.Run("warm", func(t *testing.T) { Warm(t, f) })
	t.Run("refused", func(t *testing.T) { Refused(t, f) })
	for _, victim := range []string{fleet.HostA, fleet.HostB} {
		for _, phase := range []migrate.Phase{migrate.PhasePrepare, migrate.PhaseHypervisor} {
			t.Run(fmt.Sprintf("crash %s@%s", victim, phase), func(t *testing.T) { Crash(t, f, victim, phase) })
		}
	}
	if f.HookMode() {
		t.Run("hook mode", func(t *testing.T) { HookMode(t, f) })
	}
	if f.RegistryMode() == "embedded" {
		t.Run("registry quorum", func(t *testing.T) { RegistryQuorum(t, f) })
	}
}

func scenarioContext(t *testing.T, limit time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	t.Cleanup(cancel)
	return ctx
}

// newVM creates a VM on host and returns it with its tenant's secret.
func newVM(ctx context.Context, t *testing.T, f fleet.Fleet, host, name string) (fleet.VM, string) {
	t.Helper()
	vm, err := f.CreateVM(ctx, host, name)
	if err != nil {
		t.Fatalf("create VM %s on %s: %v", name, host, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := f.RemoveVM(ctx, vm); err != nil {
			t.Errorf("remove VM %s: %v", name, err)
		}
	})
	secret, err := f.Host(host).TenantSecret(ctx, vm)
	if errors.Is(err, fleet.ErrNoTenant) {
		return vm, ""
	}
	if err != nil {
		t.Fatalf("tenant secret of %s on %s: %v", name, host, err)
	}
	return vm, secret
}

// migrate runs 'vtpmctl migrate VM --to DST' on src through its admin API.
func migrateVM(ctx context.Context, t *testing.T, f fleet.Fleet, vm fleet.VM, src, dst string, progress func(adminapi.MigrateEvent)) (adminapi.MigrateEvent, error) {
	t.Helper()
	t0 := time.Now()
	var phases []string
	end, err := f.Host(src).Admin().Migrate(ctx, adminapi.MigrateRequest{VMs: []string{vm.Name}, To: dst}, func(ev adminapi.MigrateEvent) {
		phases = append(phases, fmt.Sprintf("%s %v", ev.Phase, time.Since(t0).Round(time.Millisecond)))
		if progress != nil {
			progress(ev)
		}
	})
	t.Logf("%s: migrate %s %s->%s: %v (phases %s): %v", f.Kind(), vm.Name, src, dst, time.Since(t0).Round(time.Millisecond), strings.Join(phases, ", "), err)
	return end, err
}

// tenantKeeps checks that the VM's tenant unseals secret on host ("" : the
// fleet runs no tenant).
func tenantKeeps(ctx context.Context, t *testing.T, f fleet.Fleet, vm fleet.VM, host, secret string) {
	t.Helper()
	if secret == "" {
		return
	}
	if s, err := f.Host(host).TenantSecret(ctx, vm); err != nil || s != secret {
		t.Errorf("tenant secret on %s: %q (%v), sealed %q", host, s, err, secret)
	}
}

// moved checks that vm moved to dst with the next generation and that its
// tenant still unseals the same secret there.
func moved(ctx context.Context, t *testing.T, f fleet.Fleet, vm fleet.VM, dst string, gen uint64, secret string) {
	t.Helper()
	if err := fleet.WaitOwner(ctx, f, vm, dst, 45*time.Second); err != nil {
		t.Fatal(err)
	}
	if g, err := fleet.Generation(ctx, f.Host(dst), vm); err != nil || g != gen {
		t.Errorf("generation on %s: %d (%v), want %d", dst, g, err, gen)
	}
	tenantKeeps(ctx, t, f, vm, dst, secret)
}

// Cold: the first migration of host-a to host-b attests host-b (evidence,
// then prepare: two round trips before the hypervisor, one after); the VM
// runs on host-b alone, at generation 2, and its tenant unseals the same
// secret there.
func Cold(t *testing.T, f fleet.Fleet) {
	ctx := scenarioContext(t, 5*time.Minute)
	vm, secret := newVM(ctx, t, f, fleet.HostA, "cold-1")
	end, err := migrateVM(ctx, t, f, vm, fleet.HostA, fleet.HostB, nil)
	if err != nil || end.Result == nil || len(end.Result.Committed) != 1 {
		t.Fatalf("migration: %+v %v", end, err)
	}
	if end.Result.Warm || end.Result.RoundTrips.Before != 2 || end.Result.RoundTrips.After != 1 {
		t.Errorf("cold migration: warm %v, round trips %+v, want cold with 2+1", end.Result.Warm, end.Result.RoundTrips)
	}
	moved(ctx, t, f, vm, fleet.HostB, 2, secret)
}

// Warm: the VM goes host-a -> host-b -> host-a -> host-b; the third hop
// comes soon after the first and reuses host-b's verified evidence (one
// round trip before the hypervisor instead of two). One generation per hop.
func Warm(t *testing.T, f fleet.Fleet) {
	ctx := scenarioContext(t, 5*time.Minute)
	vm, secret := newVM(ctx, t, f, fleet.HostA, "warm-1")
	for i, hop := range [][2]string{{fleet.HostA, fleet.HostB}, {fleet.HostB, fleet.HostA}, {fleet.HostA, fleet.HostB}} {
		end, err := migrateVM(ctx, t, f, vm, hop[0], hop[1], nil)
		if err != nil || end.Result == nil || len(end.Result.Committed) != 1 {
			t.Fatalf("hop %d: %+v %v", i+1, end, err)
		}
		if i == 2 && (!end.Result.Warm || end.Result.RoundTrips.Before != 1 || end.Result.RoundTrips.After != 1) {
			t.Errorf("hop 3: warm %v, round trips %+v, want warm with 1+1", end.Result.Warm, end.Result.RoundTrips)
		}
		moved(ctx, t, f, vm, hop[1], uint64(i+2), secret)
	}
}

// Refused: host-c booted a boot chain outside the policy. A migration to it
// is refused by attestation (exit 2, the rule named) before anything left
// host-a: the VM keeps running there with its key, and host-c has no key,
// no secret and no domain.
func Refused(t *testing.T, f fleet.Fleet) {
	ctx := scenarioContext(t, 3*time.Minute)
	vm, secret := newVM(ctx, t, f, fleet.HostA, "refused-1")
	end, err := migrateVM(ctx, t, f, vm, fleet.HostA, fleet.HostC, nil)
	if !errors.Is(err, migrate.ErrRefused) || end.Code != errclass.CodeRefused || errclass.ExitCode(err) != 2 ||
		!strings.Contains(err.Error(), "rule pcr-policy") {
		t.Fatalf("migration to the untrusted host: %v (code %s), want a refusal naming rule pcr-policy", err, end.Code)
	}
	refusedNothing(ctx, t, f, vm, fleet.HostA, secret)
}

// refusedNothing checks that vm still runs on owner alone, unchanged, and
// that host-c got nothing.
func refusedNothing(ctx context.Context, t *testing.T, f fleet.Fleet, vm fleet.VM, owner, secret string) {
	t.Helper()
	moved(ctx, t, f, vm, owner, 1, secret)
	c := f.Host(fleet.HostC)
	if d, err := c.Hypervisor().Domain(ctx, vm.UUID); err != nil || d.State != hypervisor.StateAbsent {
		t.Errorf("host-c has the domain: %s %v", d.State, err)
	}
	vms, err := c.Admin().VMs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vms {
		if v.UUID == vm.UUID && (v.Owned || v.PendingTx != "") {
			t.Errorf("host-c holds the fleet.VM's key: %+v", v)
		}
	}
}

// Crash: victim's vtpmd dies when the migration of host-a to host-b reaches
// phase, and restarts (vtpmd.service: Restart=on-failure). Recovery leaves
// exactly one owner, which runs the VM with no transaction open; the
// tenant unseals the same secret there; both audit chains are intact.
func Crash(t *testing.T, f fleet.Fleet, victim string, phase migrate.Phase) {
	ctx := scenarioContext(t, 5*time.Minute)
	vm, secret := newVM(ctx, t, f, fleet.HostA, "crash-"+strings.TrimPrefix(victim, "host-")+"-"+string(phase))
	killed := false
	var killErr error
	_, err := migrateVM(ctx, t, f, vm, fleet.HostA, fleet.HostB, func(ev adminapi.MigrateEvent) {
		if !killed && ev.Phase == string(phase) {
			killed, killErr = true, f.Host(victim).Kill(ctx)
		}
	})
	if !killed {
		t.Fatalf("the migration never reached phase %s: %v", phase, err)
	}
	if killErr != nil {
		t.Fatal(killErr)
	}
	t.Logf("%s killed during %s; the migration ended with: %v", victim, phase, err)
	if err := f.Host(victim).Restart(ctx); err != nil {
		t.Fatal(err)
	}
	var owner string
	deadline := time.Now().Add(90 * time.Second)
	for {
		var report string
		owner, report, err = fleet.Owner(ctx, f, vm)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no single owner 90 s after the restart: %v\n%s", err, report)
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("recovered: %s owns and runs %s", owner, vm.Name)
	tenantKeeps(ctx, t, f, vm, owner, secret)
	for _, h := range []string{fleet.HostA, fleet.HostB} {
		if log, err := f.Host(h).Admin().Audit(ctx, "", ""); err != nil || log.Chain != adminapi.ChainIntact {
			t.Errorf("%s: audit chain %q: %v", h, log.Chain, err)
		}
	}
}

// HookMode: with vtpmm's hook installed, a plain hypervisor migration
// moves the key: host-b pulls it when the migration begins, host-a commits
// after it released the VM; the VM goes there and back. To host-c the
// hypervisor's migration fails in the hook, naming the attestation rule,
// before anything left; the VM keeps running where it was.
func HookMode(t *testing.T, f fleet.Fleet) {
	ctx := scenarioContext(t, 5*time.Minute)
	vm, secret := newVM(ctx, t, f, fleet.HostA, "hook-1")
	gen := uint64(1)
	for _, hop := range [][2]string{{fleet.HostA, fleet.HostB}, {fleet.HostB, fleet.HostA}} {
		t0 := time.Now()
		if err := f.Host(hop[0]).PlainMigrate(ctx, vm, hop[1]); err != nil {
			t.Fatalf("plain migration %s->%s through the hook: %v", hop[0], hop[1], err)
		}
		gen++
		moved(ctx, t, f, vm, hop[1], gen, secret)
		t.Logf("%s: plain migration %s->%s settled after %v", f.Kind(), hop[0], hop[1], time.Since(t0).Round(time.Millisecond))
	}
	err := f.Host(fleet.HostA).PlainMigrate(ctx, vm, fleet.HostC)
	if err == nil || !strings.Contains(err.Error(), "rule pcr-policy") {
		t.Fatalf("plain migration to the untrusted host: %v, want a hook refusal naming rule pcr-policy", err)
	}
	if err := fleet.WaitOwner(ctx, f, vm, fleet.HostA, 45*time.Second); err != nil {
		t.Fatal(err)
	}
	tenantKeeps(ctx, t, f, vm, fleet.HostA, secret)
}

// RegistryQuorum (registry mode embedded, a member in each host's vtpmd):
// with host-c's vtpmd (and its member) down, a migration host-a -> host-b
// goes through (two of three members); with host-a's down too, the
// registry has no quorum: a migration host-b -> host-a is refused before
// anything moved (exit 6), the VM keeps running on host-b, and host-b may
// still start it by its last view while its lease is known alive (the prepare-begin hook's start rule)
// while host-a may not; once both are back, the migration goes through.
func RegistryQuorum(t *testing.T, f fleet.Fleet) {
	ctx := scenarioContext(t, 8*time.Minute)
	vm, secret := newVM(ctx, t, f, fleet.HostA, "quorum-1")
	a, b, c := f.Host(fleet.HostA), f.Host(fleet.HostB), f.Host(fleet.HostC)
	restart := func(h fleet.Host) {
		if err := h.Restart(ctx); err != nil {
			t.Fatalf("restart %s: %v", h.Name(), err)
		}
	}
	if err := c.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	// If host-c's member led the cluster, a change racing its death has an
	// unknown outcome (exit 6, after op_timeout) until the others elected
	// a new leader: the operator's retry then goes through.
	var end adminapi.MigrateEvent
	var err error
	deadline := time.Now().Add(time.Minute)
	for {
		end, err = migrateVM(ctx, t, f, vm, fleet.HostA, fleet.HostB, nil)
		if !errors.Is(err, migrate.ErrRegistryUnavailable) || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Second)
	}
	if err != nil || end.Result == nil || len(end.Result.Committed) != 1 {
		t.Fatalf("migration with one registry member down: %+v %v", end, err)
	}
	if err := fleet.WaitOwnerAmong(ctx, f, vm, []string{fleet.HostA, fleet.HostB}, fleet.HostB, 45*time.Second); err != nil {
		t.Fatal(err)
	}
	tenantKeeps(ctx, t, f, vm, fleet.HostB, secret)

	if err := a.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	// host-a's vtpmd restarts only at the end: until then its member is
	// down, and with host-c's the registry has no quorum. A killed vtpmd
	// may take a moment to be gone (in process it closes in the
	// background): until the quorum is lost, the migration fails at the
	// dead destination instead, after the registry's Begin and Abort.
	deadline = time.Now().Add(time.Minute)
	for {
		end, err = migrateVM(ctx, t, f, vm, fleet.HostB, fleet.HostA, nil)
		if errors.Is(err, migrate.ErrRegistryUnavailable) || !errors.Is(err, migrate.ErrPeer) || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Second)
	}
	if !errors.Is(err, migrate.ErrRegistryUnavailable) || end.Code != errclass.CodeUnavailable || errclass.ExitCode(err) != 6 {
		t.Fatalf("migration without quorum: %v (code %s), want refused as registry-unavailable (exit 6)", err, end.Code)
	}
	if d, err := b.Hypervisor().Domain(ctx, vm.UUID); err != nil || d.State != hypervisor.StateRunning {
		t.Fatalf("the VM does not run on host-b any more: %s %v", d.State, err)
	}
	tenantKeeps(ctx, t, f, vm, fleet.HostB, secret)
	if g, err := fleet.Generation(ctx, b, vm); err != nil || g != 2 {
		t.Fatalf("host-b's generation %d (%v), want 2", g, err)
	}
	// host-b may start it by its last view only while its own liveness
	// lease is known alive (model finding F8, docs/failover.md): once the
	// lease may have expired, a majority elsewhere may have promoted a
	// standby, so host-b hands out no key (rule self-fence). Which of the
	// two it is depends on how long the quorum has been gone.
	resp, err := b.Admin().HookPrepare(ctx, adminapi.HookRequest{UUID: vm.UUID, Name: vm.Name})
	switch {
	case err == nil && resp.Generation == 2:
		t.Logf("host-b started by its last view (its lease still known alive)")
	case err != nil && strings.Contains(err.Error(), "rule "+migrate.RuleSelfFence):
		t.Logf("host-b refused by its last view: its lease is gone (%v)", err)
	default:
		t.Fatalf("host-b's start by its last view without quorum: %+v %v, want generation 2 or rule %s", resp, err, migrate.RuleSelfFence)
	}
	restart(a)
	restart(c)
	deadline = time.Now().Add(2 * time.Minute)
	for {
		end, err = migrateVM(ctx, t, f, vm, fleet.HostB, fleet.HostA, nil)
		if err == nil || !errors.Is(err, migrate.ErrRegistryUnavailable) || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Second) // the members are electing a leader again
	}
	if err != nil || end.Result == nil || len(end.Result.Committed) != 1 {
		t.Fatalf("migration once the quorum is back: %+v %v", end, err)
	}
	moved(ctx, t, f, vm, fleet.HostA, 3, secret)
}
