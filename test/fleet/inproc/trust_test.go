package inproc_test

import (
	"context"
	"crypto/rand"
	"errors"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/internal/errclass"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/host"
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
)

// The attacks of issue 10 against real vtpmd daemons (real swtpm host TPMs
// and vTPMs, the fake hypervisor, mTLS on loopback), each after its honest
// twin. The attackers are enrolled hosts of the fleet whose daemons an
// attacker controls: they write keys into their own key store and then
// drive the real protocol with them.

const hostD = "host-d" // a third trusted host

// newTrustFleet runs registry mode none: each destination decides from
// its own enrolments and key store, the defences under attack here. With
// a registry, the registry's owner and open transaction decide too (rule
// registry: TestPrepareAuthorisationRegistry, and the source's Begin
// refuses a former holder before anything is sent).
func newTrustFleet(t *testing.T, hookMode bool) *inproc.Fleet {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	f, err := inproc.New(ctx, inproc.Config{HookMode: hookMode, Registry: registry.ModeNone, Hosts: []inproc.HostSpec{
		{Name: fleet.HostA}, {Name: fleet.HostB}, {Name: hostD}, {Name: fleet.HostC, Tampered: true}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := f.Close(ctx); err != nil {
			t.Errorf("close fleet: %v", err)
		}
	})
	return f
}

func migrateVM(ctx context.Context, f *inproc.Fleet, vm fleet.VM, src, dst string) error {
	_, err := f.Host(src).Admin().Migrate(ctx, adminapi.MigrateRequest{VMs: []string{vm.UUID}, To: dst}, nil)
	return err
}

func mustMigrate(ctx context.Context, t *testing.T, f *inproc.Fleet, vm fleet.VM, src, dst string) {
	t.Helper()
	if err := migrateVM(ctx, f, vm, src, dst); err != nil {
		t.Fatalf("migrate %s %s -> %s: %v", vm.Name, src, dst, err)
	}
	if err := fleet.WaitOwner(ctx, f, vm, dst, time.Minute); err != nil {
		t.Fatal(err)
	}
}

// plantKey writes a key of the attacker's own for vm into h's key store at
// generation gen, as the attacker's vtpmd on h would: the step counted in
// h's rollback anchor like any key store change (model finding F13: the
// source's anchor counts each migration it opens, so a key planted behind
// it would leave the attacker's own migration unsettled there, and its
// next one refused before the destination's rules are reached). The
// returned func removes it the same way.
func plantKey(ctx context.Context, t *testing.T, h *inproc.Host, vm string, gen uint64) func() {
	t.Helper()
	k, err := vtpm.NewVMKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Destroy()
	hh := h.Daemon().Host()
	step := func(ctx context.Context, gen uint64, write func() error) {
		t.Helper()
		tk, err := hh.Advance(ctx, []vtpm.Change{{VMID: vm, Generation: gen}})
		if err != nil {
			t.Fatal(err)
		}
		if err := write(); err != nil {
			t.Fatal(err)
		}
		if err := hh.Settle(ctx, tk, nil); err != nil {
			t.Fatal(err)
		}
	}
	step(ctx, gen, func() error { return hh.Keys().Put(ctx, vm, gen, k) })
	return func() {
		ctx := context.Background()
		step(ctx, 0, func() error { return hh.Keys().Delete(ctx, vm) })
	}
}

func passphrase(ctx context.Context, t *testing.T, h *inproc.Host, vm string) string {
	t.Helper()
	var out string
	if _, err := h.Daemon().Host().Keys().WithPassphrase(ctx, vm, func(p []byte) error { out = string(p); return nil }); err != nil {
		t.Fatal(err)
	}
	return out
}

// wantRefused checks an admin API error: its class, its exit code, and a
// word of its message.
func wantRefused(t *testing.T, what string, err error, class errclass.Class, exit int, word string) {
	t.Helper()
	if err == nil || !errors.Is(err, class) || errclass.ExitCode(err) != exit || !strings.Contains(err.Error(), word) {
		t.Fatalf("%s: got %v (exit %d), want class %s, exit %d, naming %q", what, err, errclass.ExitCode(err), class, exit, word)
	}
	t.Logf("%s (exit %d): %v", what, exit, err)
}

// nothingOn checks that h holds nothing of vm: no key, no pending
// transaction, no hypervisor secret.
func nothingOn(ctx context.Context, t *testing.T, h fleet.Host, vm fleet.VM) {
	t.Helper()
	vms, err := h.Admin().VMs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vms {
		if v.UUID == vm.UUID && (v.Owned || v.PendingTx != "") {
			t.Fatalf("%s holds %s: %+v", h.Name(), vm.Name, v)
		}
	}
	if has, _ := h.Hypervisor().HasSecret(ctx, vm.UUID); has {
		t.Fatalf("%s has a secret for %s", h.Name(), vm.Name)
	}
}

// coldRestart stops the VM on h and starts it again there: it works only
// with the right secret, and the tenant unseals what it sealed.
func coldRestart(ctx context.Context, t *testing.T, h *inproc.Host, vm fleet.VM, secret string) {
	t.Helper()
	if err := h.Fake().DestroyDomain(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if err := h.Fake().StartDomain(ctx, vm.UUID); err != nil {
		t.Fatalf("cold start of %s on %s: %v", vm.Name, h.Name(), err)
	}
	if got, err := h.TenantSecret(ctx, vm); err != nil || got != secret {
		t.Fatalf("tenant on %s unsealed %q (%v), want %q", h.Name(), got, err, secret)
	}
}

// oldKeyOpensNothing checks that pass no longer opens the VM's vTPM state
// on h (a copy of it, started in a private swtpm).
func oldKeyOpensNothing(ctx context.Context, t *testing.T, h *inproc.Host, vm fleet.VM, pass string) {
	t.Helper()
	state, err := h.Fake().VTPMStateDir(ctx, vm.UUID)
	if err != nil {
		t.Fatal(err)
	}
	cp := filepath.Join(t.TempDir(), "tpm2")
	if out, err := exec.Command("cp", "-a", state, cp).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	p, err := swtpm.Start(ctx, swtpm.ProcessConfig{StateDir: cp, Passphrase: []byte(pass)})
	if err == nil {
		err = p.Init(ctx)
		_ = p.Stop(ctx)
	}
	if !errors.Is(err, swtpm.ErrWrongPassphrase) {
		t.Fatalf("the former key on the rekeyed state: %v, want ErrWrongPassphrase", err)
	}
}

// TestTrustBoundaries runs issue 10's attacks 1, 2, 3, 6 and 7 and the key
// rotation on demand on one fleet, in order.
func TestTrustBoundaries(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newTrustFleet(t, false)
	a, b, c := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB), f.InProcHost(fleet.HostC)
	vm, err := f.CreateVM(ctx, fleet.HostA, "web-1")
	if err != nil {
		t.Fatal(err)
	}
	secret, err := a.TenantSecret(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	// The honest twin: A -> B -> A; B is a former holder now.
	mustMigrate(ctx, t, f, vm, fleet.HostA, fleet.HostB)
	mustMigrate(ctx, t, f, vm, fleet.HostB, fleet.HostA)

	t.Run("attack 1: a Prepare from an unenrolled host at generation 2^64-1", func(t *testing.T) {
		// C (enrolled by everyone, booted tampered) warms its evidence of
		// B with a VM of its own, then B forgets C's enrolment.
		cvm, err := f.CreateVM(ctx, fleet.HostC, "c-1")
		if err != nil {
			t.Fatal(err)
		}
		mustMigrate(ctx, t, f, cvm, fleet.HostC, fleet.HostB)
		enr := b.Config().Attestation.Enrollments
		orig, err := os.ReadFile(enr)
		if err != nil {
			t.Fatal(err)
		}
		unenrolled := strings.ReplaceAll(string(orig), `"host": "host-c"`, `"host": "host-c-retired"`)
		if err := os.WriteFile(enr, []byte(unenrolled), 0o600); err != nil {
			t.Fatal(err)
		}
		unplant := plantKey(ctx, t, c, vm.UUID, math.MaxUint64-1)
		err = migrateVM(ctx, f, vm, fleet.HostC, fleet.HostB)
		wantRefused(t, "unenrolled C sends B a Prepare for A's VM", err, errclass.Denied, 2, "rule sender-enrolled")
		nothingOn(ctx, t, b, vm)
		// Enrolled again, at 2^64-1 it is the generation bounds.
		if err := os.WriteFile(enr, orig, 0o600); err != nil {
			t.Fatal(err)
		}
		err = migrateVM(ctx, f, vm, fleet.HostC, fleet.HostB)
		wantRefused(t, "enrolled C at generation 2^64-1", err, errclass.Denied, 2, "rule generation")
		nothingOn(ctx, t, b, vm)
		unplant()
		// The owner still migrates there, and back: no generation burnt.
		mustMigrate(ctx, t, f, vm, fleet.HostA, fleet.HostB)
		mustMigrate(ctx, t, f, vm, fleet.HostB, fleet.HostA)
	})

	t.Run("attacks 2 and 3: the former holder overwrites the owner's key", func(t *testing.T) {
		gen, err := fleet.Generation(ctx, a, vm)
		if err != nil || gen == 0 {
			t.Fatalf("A's generation %d (%v)", gen, err)
		}
		before := passphrase(ctx, t, a, vm.UUID)
		unplant := plantKey(ctx, t, b, vm.UUID, gen)
		err = migrateVM(ctx, f, vm, fleet.HostB, fleet.HostA)
		wantRefused(t, "former holder B sends A a Prepare for A's running VM", err, errclass.Denied, 2, "rule owned-here")
		unplant()
		if g, _ := fleet.Generation(ctx, a, vm); g != gen || passphrase(ctx, t, a, vm.UUID) != before {
			t.Fatalf("A's key changed: generation %d -> %d", gen, g)
		}
		// The owner's secret survived the refusal: a cold start works.
		coldRestart(ctx, t, a, vm, secret)
		if _, _, err := fleet.Owner(ctx, f, vm); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("damaged envelope: one VM marked, the others usable", func(t *testing.T) {
		vm2, err := f.CreateVM(ctx, fleet.HostA, "web-2")
		if err != nil {
			t.Fatal(err)
		}
		file := filepath.Join(a.Config().DataDir, "keys", vm2.UUID+".key")
		orig, _ := os.ReadFile(file)
		if err := os.WriteFile(file, orig[:len(orig)/2], 0o600); err != nil {
			t.Fatal(err)
		}
		vms, err := a.Admin().VMs(ctx)
		if err != nil {
			t.Fatalf("vm list with one damaged envelope: %v", err)
		}
		for _, v := range vms {
			switch v.UUID {
			case vm2.UUID:
				if v.Owned || !strings.Contains(v.Damaged, file) {
					t.Fatalf("damaged VM listed as %+v", v)
				}
			case vm.UUID:
				if !v.Owned || v.Generation == 0 || v.Damaged != "" {
					t.Fatalf("healthy VM listed as %+v", v)
				}
			}
		}
		_, err = a.Admin().Rekey(ctx, vm2.UUID)
		wantRefused(t, "rekey of the damaged VM", err, errclass.Damaged, 7, "envelope damaged")
		mustMigrate(ctx, t, f, vm, fleet.HostA, fleet.HostB)
		mustMigrate(ctx, t, f, vm, fleet.HostB, fleet.HostA)
		if err := os.WriteFile(file, orig, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := f.RemoveVM(ctx, vm2); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("rekey on demand: a former holder's key opens nothing", func(t *testing.T) {
		old := passphrase(ctx, t, a, vm.UUID) // what B, a former holder, had
		_, err := a.Admin().Rekey(ctx, vm.UUID)
		wantRefused(t, "rekey of a running VM", err, errclass.InUse, 5, "shut it off first")
		if err := a.Fake().DestroyDomain(ctx, vm.UUID); err != nil {
			t.Fatal(err)
		}
		gen, _ := fleet.Generation(ctx, a, vm)
		tpm0 := a.Daemon().Host().Meter().Stats()
		info, err := a.Admin().Rekey(ctx, vm.UUID)
		if err != nil {
			t.Fatalf("rekey: %v", err)
		}
		cmds := a.Daemon().Host().Meter().Stats().Sub(tpm0)
		t.Logf("rekey of %s: %d bytes of vTPM state in %s, %d host TPM commands", vm.Name, info.Bytes, info.Took, cmds.Total)
		if cmds.Total != 0 || info.Generation != gen || info.Bytes == 0 {
			t.Fatalf("rekey: %+v, %d host TPM commands", info, cmds.Total)
		}
		if passphrase(ctx, t, a, vm.UUID) == old {
			t.Fatal("the key did not change")
		}
		oldKeyOpensNothing(ctx, t, a, vm, old)
		if err := a.Fake().StartDomain(ctx, vm.UUID); err != nil {
			t.Fatalf("start with the new key: %v", err)
		}
		if got, err := a.TenantSecret(ctx, vm); err != nil || got != secret {
			t.Fatalf("tenant after the rekey: %q %v", got, err)
		}
		log, err := a.Admin().Audit(ctx, vm.UUID, string(audit.EventRekey))
		if err != nil || len(log.Records) != 1 {
			t.Fatalf("audit of the rekey: %+v %v", log.Records, err)
		}
		// The VM still migrates.
		mustMigrate(ctx, t, f, vm, fleet.HostA, fleet.HostB)
		mustMigrate(ctx, t, f, vm, fleet.HostB, fleet.HostA)
	})

	t.Run("attack 6: a whole data directory restored", func(t *testing.T) {
		// B owns the VM; its data directory is backed up; the VM leaves.
		mustMigrate(ctx, t, f, vm, fleet.HostA, fleet.HostB)
		data := b.Config().DataDir
		backup := data + ".backup"
		stopped(ctx, t, b, func() { copyDir(t, data, backup) })
		mustMigrate(ctx, t, f, vm, fleet.HostB, fleet.HostA)
		// B restored from the backup: refused at start, naming the
		// rollback and the way out.
		if err := b.Kill(ctx); err != nil {
			t.Fatal(err)
		}
		newest := putBackup(t, data, backup)
		err := b.Restart(ctx)
		if !errors.Is(err, vtpm.ErrRollback) || !strings.Contains(err.Error(), "vtpmd anchor accept") {
			t.Fatalf("restart of B on the restored directory: %v, want the rollback refusal", err)
		}
		t.Logf("restored data directory: %v", err)
		// The newest directory back: B starts, holds nothing of the VM.
		putNewest(t, data, newest)
		if err := b.Restart(ctx); err != nil {
			t.Fatalf("restart on the newest directory: %v", err)
		}
		if _, _, err := fleet.Owner(ctx, f, vm); err != nil {
			t.Fatal(err)
		}
		// A lost ledger: refused, never re-created empty; an audited
		// acceptance of the lost history lets B start.
		if err := b.Kill(ctx); err != nil {
			t.Fatal(err)
		}
		stopWait(ctx, t, b)
		if err := os.Rename(filepath.Join(data, "ledger.db"), filepath.Join(data, "ledger.db.damaged")); err != nil {
			t.Fatal(err)
		}
		err = b.Restart(ctx)
		if !errors.Is(err, migrate.ErrLedgerHistoryLost) || !strings.Contains(err.Error(), "ledger.db") {
			t.Fatalf("restart without its ledger: %v, want ErrLedgerHistoryLost", err)
		}
		t.Logf("lost ledger: %v", err)
		accept(ctx, t, b, "the ledger was moved aside as damaged (test)")
		if err := b.Restart(ctx); err != nil {
			t.Fatalf("restart after the acceptance: %v", err)
		}
		mustMigrate(ctx, t, f, vm, fleet.HostA, fleet.HostB)
	})
}

// stopped runs fn while h's vtpmd is stopped.
func stopped(ctx context.Context, t *testing.T, h *inproc.Host, fn func()) {
	t.Helper()
	if err := h.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	stopWait(ctx, t, h)
	fn()
	if err := h.Restart(ctx); err != nil {
		t.Fatal(err)
	}
}

// stopWait waits until a killed daemon let go of its files and TPM.
func stopWait(ctx context.Context, t *testing.T, h *inproc.Host) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		if _, err := h.Admin().VMs(ctx); err != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s's vtpmd did not stop", h.Name())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// putBackup moves the data directory data aside (to the returned path)
// and puts the backup's copy in its place, as an operator restoring it.
func putBackup(t *testing.T, data, backup string) string {
	t.Helper()
	newest := data + ".newest"
	if err := os.Rename(data, newest); err != nil {
		t.Fatal(err)
	}
	copyDir(t, backup, data)
	return newest
}

// putNewest puts the directory putBackup moved aside back in place.
func putNewest(t *testing.T, data, newest string) {
	t.Helper()
	if err := os.RemoveAll(data); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(newest, data); err != nil {
		t.Fatal(err)
	}
}

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	_ = os.RemoveAll(to)
	if out, err := exec.Command("cp", "-a", from, to).CombinedOutput(); err != nil {
		t.Fatalf("cp %s %s: %v %s", from, to, err, out)
	}
}

// accept is 'vtpmd anchor accept --history-lost' on h (its vtpmd stopped).
func accept(ctx context.Context, t *testing.T, h *inproc.Host, reason string) {
	t.Helper()
	cfg := h.Config()
	log, err := audit.Open(cfg.AuditLogPath(), audit.Options{Host: h.Name()})
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	rec, err := host.AcceptAnchor(ctx, cfg.Config, host.Options{}, host.AcceptOptions{AnchorAcceptance: vtpm.AnchorAcceptance{
		Operator: "test", Reason: reason, ResetHistory: true,
		Audit: func(ctx context.Context, r vtpm.AnchorAcceptRecord) error {
			return log.Append(ctx, audit.Record{Event: audit.EventAnchorAccept, Detail: r.String()})
		},
		Mark: func() *vtpm.AuditMark { s, hd := log.Head(); return &vtpm.AuditMark{Seq: s, Head: hd} },
	}})
	if err != nil {
		t.Fatalf("accept on %s: %v", h.Name(), err)
	}
	t.Logf("%s", rec)
}

// TestPullAndRotationHookMode: issue 10's attack 4 on a fleet in hook mode
// (B pulls A's VM while A's hypervisor migrates it to D), and the key
// rotation once the VM stopped after a migration.
func TestPullAndRotationHookMode(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newTrustFleet(t, true)
	a, b, d := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB), f.InProcHost(hostD)
	vm, err := f.CreateVM(ctx, fleet.HostA, "web-1")
	if err != nil {
		t.Fatal(err)
	}
	secret, err := a.TenantSecret(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	plain := func(from, to *inproc.Host) {
		t.Helper()
		if err := from.PlainMigrate(ctx, vm, to.Name()); err != nil {
			t.Fatalf("plain migration %s -> %s: %v", from.Name(), to.Name(), err)
		}
		if err := fleet.WaitOwner(ctx, f, vm, to.Name(), time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	// The honest twin.
	plain(a, d)
	plain(d, a)

	// B asks for the key right after D's pull, while the VM still runs on A.
	dPull := d.Fake().MigrateBegin
	var bPull error
	d.Fake().MigrateBegin = func(ctx context.Context, id, name string) error {
		if err := dPull(ctx, id, name); err != nil {
			return err
		}
		_, bPull = b.Admin().HookPull(ctx, adminapi.HookRequest{UUID: id, Name: name})
		return nil
	}
	plain(a, d)
	d.Fake().MigrateBegin = dPull
	wantRefused(t, "B pulls during A's job to D", bPull, errclass.NotMigrating, 1, "migrates it to host-d, not to host-b")
	nothingOn(ctx, t, b, vm)
	if got, err := d.TenantSecret(ctx, vm); err != nil || got != secret {
		t.Fatalf("tenant on D: %q %v", got, err)
	}

	// D received the key by migration: it rotates once the VM stopped
	// there (hook "release end" or the stopped event, in the background:
	// never inside a libvirt hook), and the old key opens nothing.
	rotate := func() bool {
		vms, _ := d.Admin().VMs(ctx)
		for _, v := range vms {
			if v.UUID == vm.UUID {
				return v.Rotate
			}
		}
		return false
	}
	if !rotate() {
		t.Fatal("D does not mark the received key for rotation")
	}
	old := passphrase(ctx, t, d, vm.UUID)
	tpm0 := d.Daemon().Host().Meter().Stats()
	t0 := time.Now()
	if err := d.Fake().DestroyDomain(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(time.Minute); rotate(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the key was not rotated after the VM stopped")
		}
	}
	t.Logf("key rotation after the stop: %v, %d host TPM commands", time.Since(t0).Round(time.Millisecond), d.Daemon().Host().Meter().Stats().Sub(tpm0).Total)
	if passphrase(ctx, t, d, vm.UUID) == old {
		t.Fatal("the key was not rotated")
	}
	if err := d.Fake().StartDomain(ctx, vm.UUID); err != nil {
		t.Fatalf("cold start with the new key: %v", err)
	}
	if got, err := d.TenantSecret(ctx, vm); err != nil || got != secret {
		t.Fatalf("tenant after the rotation: %q %v", got, err)
	}
	if err := d.Fake().DestroyDomain(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	oldKeyOpensNothing(ctx, t, d, vm, old)
	if err := d.Fake().StartDomain(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if st, _ := d.Hypervisor().Domain(ctx, vm.UUID); st.State != hypervisor.StateRunning {
		t.Fatalf("VM on D: %s", st.State)
	}
	plain(d, a)
}
