package vtpm_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

const (
	vmA = "0e2e0e2e-0000-4000-8000-00000000a001"
	vmB = "0e2e0e2e-0000-4000-8000-00000000a002"
	vmC = "0e2e0e2e-0000-4000-8000-00000000a003"
)

// anchorHost is an emulated host with a vault, a key store and an anchor
// whose TPM commands go through a dtpm-profile meter that does not sleep.
type anchorHost struct {
	tpm   transport.TPM
	meter *vtpm.Meter
	vault *vtpm.Vault
	ks    *vtpm.KeyStore
	dir   string
	cfg   vtpm.AnchorConfig
}

func newAnchorHost(t *testing.T) *anchorHost {
	t.Helper()
	_, tpm := tpmtest.NewHost(t)
	return newAnchorHostOn(t, tpm)
}

func newAnchorHostOn(t *testing.T, tpm transport.TPM) *anchorHost {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	v, err := vtpm.InitVault(ctx, tpm, vtpm.VaultConfig{Dir: dir}, vtpm.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	ks, err := vtpm.NewKeyStore(dir, "host-a", v, nil)
	if err != nil {
		t.Fatal(err)
	}
	m := vtpm.NewMeter(tpm, vtpm.ProfileDTPM, vtpm.WithSleep(func(time.Duration) {}))
	return &anchorHost{tpm: tpm, meter: m, vault: v, ks: ks, dir: dir, cfg: vtpm.AnchorConfig{Dir: dir}}
}

func (h *anchorHost) facts(t *testing.T) vtpm.Facts {
	t.Helper()
	f, err := h.ks.Facts(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func (h *anchorHost) init(t *testing.T) *vtpm.Anchor {
	t.Helper()
	a, err := vtpm.InitAnchor(context.Background(), h.meter, h.vault, h.cfg, h.facts(t), vtpm.AnchorInitOptions{})
	if err != nil {
		t.Fatalf("InitAnchor: %v", err)
	}
	t.Cleanup(a.Close)
	return a
}

func (h *anchorHost) open(t *testing.T) *vtpm.Anchor {
	t.Helper()
	a, err := vtpm.OpenAnchor(context.Background(), h.meter, h.vault, h.cfg)
	if err != nil {
		t.Fatalf("OpenAnchor: %v", err)
	}
	t.Cleanup(a.Close)
	return a
}

// measure runs f and returns the TPM commands it sent and their modelled
// time under the dtpm profile.
func (h *anchorHost) measure(t *testing.T, f func()) vtpm.Stats {
	t.Helper()
	before := h.meter.Stats()
	f()
	return h.meter.Stats().Sub(before)
}

func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	_ = os.RemoveAll(dst)
	if out, err := exec.Command("cp", "-a", src, dst).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
}

// migrateOut is the source's commit of a batch: Advance, shred, Settle.
func migrateOut(t *testing.T, h *anchorHost, a *vtpm.Anchor, vms ...string) {
	t.Helper()
	ctx := context.Background()
	var ch []vtpm.Change
	for _, vm := range vms {
		ch = append(ch, vtpm.Change{VMID: vm})
	}
	tk, err := a.Advance(ctx, ch)
	if err != nil {
		t.Fatalf("Advance: %v", err)
	}
	for _, vm := range vms {
		if err := h.ks.Delete(ctx, vm); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.Settle(ctx, tk, h.facts(t)); err != nil {
		t.Fatalf("Settle: %v", err)
	}
}

func TestAnchorCostAndHonestLifecycle(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newAnchorHost(t)
	for _, vm := range []string{vmA, vmB} {
		if _, _, err := h.ks.Create(ctx, vm); err != nil {
			t.Fatal(err)
		}
	}
	var a *vtpm.Anchor
	s := h.measure(t, func() { a = h.init(t) })
	t.Logf("InitAnchor: %d TPM commands (%s), %v modelled under dtpm", s.Total, s, s.Injected)

	st, err := os.Stat(a.Path())
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("anchor file mode %v, %v", st.Mode(), err)
	}
	// Check: exactly one NV_Read.
	var status *vtpm.AnchorStatus
	s = h.measure(t, func() { status, err = a.Check(ctx, h.facts(t)) })
	if err != nil {
		t.Fatalf("Check on an honest host: %v", err)
	}
	if s.Total != 1 || s.ByCode[tpm2.TPMCCNVRead] != 1 {
		t.Fatalf("Check sent %s, want exactly NV_Read=1", s)
	}
	t.Logf("Check: %s, %v modelled under dtpm", s, s.Injected)
	if status.Counter != status.TPMCounter || status.Repaired || len(status.Pending) != 0 || status.Advances != 0 {
		t.Fatalf("status %+v", status)
	}

	// A destination's commit: VM C arrives at generation 4 (Advance, then
	// the key store commits, then Settle). Advance is exactly one
	// NV_Increment, Settle none.
	var tk vtpm.AnchorTicket
	s = h.measure(t, func() { tk, err = a.Advance(ctx, []vtpm.Change{{VMID: vmC, Generation: 4}}) })
	if err != nil {
		t.Fatal(err)
	}
	if s.Total != 1 || s.ByCode[tpm2.TPMCCNVIncrement] != 1 {
		t.Fatalf("Advance sent %s, want exactly NV_Increment=1", s)
	}
	t.Logf("Advance: %s, %v modelled under dtpm", s, s.Injected)
	k, _ := vtpm.NewVMKey(nil)
	if err := h.ks.Put(ctx, vmC, 4, k); err != nil {
		t.Fatal(err)
	}
	s = h.measure(t, func() { err = a.Settle(ctx, tk, h.facts(t)) })
	if err != nil || s.Total != 0 {
		t.Fatalf("Settle: %v, %s", err, s)
	}
	// A source's commit: VM A leaves.
	migrateOut(t, h, a, vmA)
	if a.Advances() != 2 {
		t.Fatalf("Advances = %d, want 2", a.Advances())
	}

	// Restart: a new Anchor from the file, one NV_Read.
	b := h.open(t)
	status, err = b.Check(ctx, h.facts(t))
	if err != nil {
		t.Fatalf("Check after restart: %v", err)
	}
	if status.Counter != a.Counter() || status.Advances != 2 {
		t.Fatalf("status after restart %+v", status)
	}
}

func TestAnchorDetectsRestoredDataDirectory(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newAnchorHost(t)
	for _, vm := range []string{vmA, vmB} {
		if _, _, err := h.ks.Create(ctx, vm); err != nil {
			t.Fatal(err)
		}
	}
	a := h.init(t)
	backup := filepath.Join(t.TempDir(), "backup")
	copyTree(t, h.dir, backup)

	// Honest twin: the backup restored before anything changed is current.
	if _, err := a.Check(ctx, h.facts(t)); err != nil {
		t.Fatal(err)
	}
	// VM A migrates away (the source's commit), then the whole directory is
	// restored from the backup: it lists VM A as held at generation 1.
	migrateOut(t, h, a, vmA)
	a.Close()
	copyTree(t, backup, h.dir)

	b := h.open(t)
	_, err := b.Check(ctx, h.facts(t))
	var re *vtpm.RollbackError
	if !errors.As(err, &re) || !errors.Is(err, vtpm.ErrRollback) {
		t.Fatalf("Check of a restored directory = %v, want a *RollbackError", err)
	}
	if re.TPMCounter != re.FileCounter+1 || re.File != filepath.Join(h.dir, vtpm.AnchorFileName) {
		t.Fatalf("RollbackError %+v", re)
	}
	if !strings.Contains(err.Error(), "vtpmd anchor accept") {
		t.Errorf("the error does not say what to do: %v", err)
	}
	t.Logf("restored directory: %v", err)
}

func TestAnchorDetectsRestoredEnvelope(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newAnchorHost(t)
	for _, vm := range []string{vmA, vmB} {
		if _, _, err := h.ks.Create(ctx, vm); err != nil {
			t.Fatal(err)
		}
	}
	a := h.init(t)
	saved, err := os.ReadFile(filepath.Join(h.dir, "keys", vmA+".key"))
	if err != nil {
		t.Fatal(err)
	}
	migrateOut(t, h, a, vmA)
	if _, err := a.Check(ctx, h.facts(t)); err != nil {
		t.Fatalf("honest twin: %v", err)
	}
	// Only VM A's envelope comes back from a backup.
	if err := os.WriteFile(filepath.Join(h.dir, "keys", vmA+".key"), saved, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = a.Check(ctx, h.facts(t))
	var me *vtpm.AnchorMismatchError
	if !errors.As(err, &me) || !errors.Is(err, vtpm.ErrAnchorMismatch) {
		t.Fatalf("Check with a restored envelope = %v, want *AnchorMismatchError", err)
	}
	if len(me.Diffs) != 1 || me.Diffs[0].VMID != vmA || me.Diffs[0].KeyStore != 1 || me.Diffs[0].Anchor != 0 {
		t.Fatalf("diffs %+v", me.Diffs)
	}
	t.Logf("restored envelope: %v", err)

	// A deleted envelope (VM B) is named too; a damaged one is skipped.
	if err := os.Remove(filepath.Join(h.dir, "keys", vmA+".key")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(h.dir, "keys", vmB+".key"), filepath.Join(t.TempDir(), "b")); err != nil {
		t.Fatal(err)
	}
	_, err = a.Check(ctx, h.facts(t))
	if !errors.As(err, &me) || len(me.Diffs) != 1 || me.Diffs[0].VMID != vmB || me.Diffs[0].KeyStore != 0 {
		t.Fatalf("Check with a deleted envelope = %v", err)
	}
	st, err := a.Check(ctx, vtpm.Facts{Damaged: []string{vmB}})
	if err != nil || len(st.Damaged) != 1 {
		t.Fatalf("Check with B listed as damaged = %+v, %v", st, err)
	}
}

// crashTPM forwards commands until it sees crashOn; from then on every
// command fails, as if vtpmd died just before sending it.
type crashTPM struct {
	next    transport.TPM
	crashOn tpm2.TPMCC
	onCrash func()
	dead    bool
}

func (c *crashTPM) Send(cmd []byte) ([]byte, error) {
	if len(cmd) >= 10 && tpm2.TPMCC(uint32(cmd[6])<<24|uint32(cmd[7])<<16|uint32(cmd[8])<<8|uint32(cmd[9])) == c.crashOn {
		c.dead = true
		if c.onCrash != nil {
			c.onCrash()
		}
	}
	if c.dead {
		return nil, errors.New("crashed")
	}
	return c.next.Send(cmd)
}

func TestAnchorCrashBetweenFileAndIncrement(t *testing.T) {
	t.Parallel()
	// "process died": vtpmd dies after writing the file and before
	// NV_Increment (the disk is what it was at that moment). "increment
	// failed": NV_Increment fails and Advance returns an error.
	for _, died := range []bool{true, false} {
		t.Run(fmt.Sprintf("process-died=%v", died), func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			h := newAnchorHost(t)
			if _, _, err := h.ks.Create(ctx, vmA); err != nil {
				t.Fatal(err)
			}
			a := h.init(t)
			before := a.Counter()
			window := filepath.Join(t.TempDir(), "window")
			crash := &crashTPM{next: h.tpm, crashOn: tpm2.TPMCCNVIncrement,
				onCrash: func() { copyTree(t, h.dir, window) }} // the disk at the crash, and a backup taken then
			dying, err := vtpm.OpenAnchor(ctx, crash, h.vault, h.cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer dying.Close()
			if _, err := dying.Advance(ctx, []vtpm.Change{{VMID: vmA}}); err == nil {
				t.Fatal("Advance through a dead TPM connection succeeded")
			}
			if died {
				copyTree(t, window, h.dir)
			}
			// Restart: the file is one ahead; the key store is unchanged (the
			// caller never shredded). Check completes the increment (one more
			// command, in this case only).
			b := h.open(t)
			if b.Counter() != before+1 {
				t.Fatalf("file counter %d, want %d (written ahead)", b.Counter(), before+1)
			}
			var st *vtpm.AnchorStatus
			s := h.measure(t, func() { st, err = b.Check(ctx, h.facts(t)) })
			if err != nil {
				t.Fatalf("Check after a crash before the increment: %v", err)
			}
			wantPending := 0
			if died {
				wantPending = 1 // the step is unsettled: reconcile, then SettleAll
			}
			if !st.Repaired || st.Counter != before+1 || st.TPMCounter != before+1 || len(st.Pending) != wantPending ||
				s.Total != 2 || s.ByCode[tpm2.TPMCCNVIncrement] != 1 {
				t.Fatalf("status %+v after %s", st, s)
			}
			t.Logf("Check after a crash before the increment: %s, %v modelled", s, s.Injected)
			if err := b.SettleAll(ctx, h.facts(t)); err != nil {
				t.Fatal(err)
			}
			// The backup taken in the window is the live state's equal...
			if _, err := b.Check(ctx, h.facts(t)); err != nil {
				t.Fatal(err)
			}
			// ...until the next step, after which it is a rollback.
			migrateOut(t, h, b, vmA)
			b.Close()
			copyTree(t, window, h.dir)
			c := h.open(t)
			if _, err := c.Check(ctx, h.facts(t)); !errors.Is(err, vtpm.ErrRollback) {
				t.Fatalf("backup from the window after a later step: %v, want ErrRollback", err)
			}
		})
	}
}

func TestAnchorCrashBeforeSettle(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	for _, shredded := range []bool{false, true} {
		t.Run(fmt.Sprintf("shredded=%v", shredded), func(t *testing.T) {
			t.Parallel()
			h := newAnchorHost(t)
			if _, _, err := h.ks.Create(ctx, vmA); err != nil {
				t.Fatal(err)
			}
			a := h.init(t)
			if _, err := a.Advance(ctx, []vtpm.Change{{VMID: vmA}}); err != nil {
				t.Fatal(err)
			}
			if shredded {
				if err := h.ks.Delete(ctx, vmA); err != nil {
					t.Fatal(err)
				}
			}
			// Crash: no Settle. At start the key store may be at either end.
			b := h.open(t)
			st, err := b.Check(ctx, h.facts(t))
			if err != nil || len(st.Pending) != 1 || st.Repaired {
				t.Fatalf("Check with an unsettled step: %+v, %v", st, err)
			}
			// The ledger is reconciled (the step completes), then SettleAll.
			if !shredded {
				if err := h.ks.Delete(ctx, vmA); err != nil {
					t.Fatal(err)
				}
			}
			if err := b.SettleAll(ctx, h.facts(t)); err != nil {
				t.Fatal(err)
			}
			st, err = b.Check(ctx, h.facts(t))
			if err != nil || len(st.Pending) != 0 {
				t.Fatalf("after SettleAll: %+v, %v", st, err)
			}
			// Now the released envelope cannot come back unnoticed.
			if _, err := b.Check(ctx, vtpm.Facts{Holdings: []vtpm.Holding{{VMID: vmA, Generation: 1}}}); !errors.Is(err, vtpm.ErrAnchorMismatch) {
				t.Fatalf("restored envelope after settle: %v", err)
			}
		})
	}
}

func TestAnchorRefusesOverlappingSteps(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newAnchorHost(t)
	a := h.init(t)
	t1, err := a.Advance(ctx, []vtpm.Change{{VMID: vmA, Generation: 2}, {VMID: vmB, Generation: 3}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Advance(ctx, []vtpm.Change{{VMID: vmB, Generation: 4}}); !errors.Is(err, vtpm.ErrAnchorBusy) {
		t.Fatalf("overlapping step: %v, want ErrAnchorBusy", err)
	}
	t2, err := a.Advance(ctx, []vtpm.Change{{VMID: vmC, Generation: 1}})
	if err != nil {
		t.Fatal(err)
	}
	// Settle with an outcome that is neither end of the step: refused.
	bad := vtpm.Facts{Holdings: []vtpm.Holding{{VMID: vmA, Generation: 7}, {VMID: vmB, Generation: 3}}}
	if err := a.Settle(ctx, t1, bad); !errors.Is(err, vtpm.ErrAnchorMismatch) {
		t.Fatalf("Settle with generation 7: %v", err)
	}
	// A aborted (never arrived), B committed; C still in flight.
	if err := a.Settle(ctx, t1, vtpm.Facts{Holdings: []vtpm.Holding{{VMID: vmB, Generation: 3}}}); err != nil {
		t.Fatal(err)
	}
	st, err := a.Check(ctx, vtpm.Facts{Holdings: []vtpm.Holding{{VMID: vmB, Generation: 3}}})
	if err != nil || len(st.Pending) != 1 || st.Pending[0] != t2 {
		t.Fatalf("Check: %+v, %v", st, err)
	}
}

func TestAnchorFileTamperingDetected(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newAnchorHost(t)
	if _, _, err := h.ks.Create(ctx, vmA); err != nil {
		t.Fatal(err)
	}
	a := h.init(t)
	migrateOut(t, h, a, vmA)
	path := a.Path()
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	edit := func(f func(m map[string]any)) []byte {
		var m map[string]any
		if err := json.Unmarshal(orig, &m); err != nil {
			t.Fatal(err)
		}
		f(m)
		b, _ := json.Marshal(m)
		return b
	}
	for _, tc := range []struct {
		name string
		data []byte
		want error
	}{
		{"counter raised to hide a rollback", edit(func(m map[string]any) { m["counter"] = m["counter"].(float64) + 5 }), vtpm.ErrCorrupt},
		{"holding added", edit(func(m map[string]any) {
			m["holdings"] = []any{map[string]any{"vm": vmA, "gen": 1}}
		}), vtpm.ErrCorrupt},
		{"another vault's file", edit(func(m map[string]any) { m["key_id"] = "0123456789abcdef" }), vtpm.ErrWrongKey},
		{"unknown version", edit(func(m map[string]any) { m["version"] = 9 }), vtpm.ErrUnsupportedVersion},
		{"empty", nil, vtpm.ErrCorrupt},
		{"truncated", orig[:len(orig)/2], vtpm.ErrCorrupt},
	} {
		if err := os.WriteFile(path, tc.data, 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := vtpm.OpenAnchor(ctx, h.meter, h.vault, h.cfg)
		var fe *vtpm.AnchorFileError
		if !errors.Is(err, tc.want) || !errors.As(err, &fe) || fe.Path != path {
			t.Errorf("%s: OpenAnchor = %v, want %v naming %s", tc.name, err, tc.want, path)
		}
	}
	if err := os.WriteFile(path, orig, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := h.open(t).Check(ctx, h.facts(t)); err != nil {
		t.Fatalf("original file: %v", err)
	}
}
