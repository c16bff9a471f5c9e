package migrate_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/vtpm"
)

// owners returns the hosts whose hypervisor runs vm and whose key store
// holds its key, and fails on any PENDING key or open transaction left.
func (f *fleet) checkSingleOwner(vm string, want string) {
	t, ctx := f.t, context.Background()
	t.Helper()
	var running, keyed []string
	for name, h := range f.hosts {
		if d, err := h.hyp.Domain(ctx, vm); err == nil && d.State == hypervisor.StateRunning {
			running = append(running, name)
		}
		if _, _, err := h.keys.Get(ctx, vm); err == nil {
			keyed = append(keyed, name)
		}
		if tx, ok := h.node.Incoming(vm); ok {
			t.Errorf("%s: incoming transaction %s of %s left open", name, tx.ID, vm)
		}
		if files := h.pendingKeyFiles(vm); len(files) > 0 {
			t.Errorf("%s: PENDING key of %s left behind: %v", name, vm, files)
		}
		if open, _ := h.ledger.OpenTxs(); len(open) != 0 {
			t.Errorf("%s: %d open transactions left: %+v", name, len(open), open)
		}
	}
	if len(running) != 1 || running[0] != want || len(keyed) != 1 || keyed[0] != want {
		t.Fatalf("VM %s runs on %v and is keyed on %v; want exactly %s", vm, running, keyed, want)
	}
}

func TestMigrateHappyPathWarmAndBack(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	vm := a.createVM("vm1")
	secret := []byte("tenant disk key 1234")
	a.guestSeal(vm, secret)
	pass := a.passphrase(vm)
	raw, _ := hex.DecodeString(pass)

	var phases []migrate.Phase
	before := [2]vtpm.Stats{a.meter.Stats(), b.meter.Stats()}
	res, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, func(p migrate.Phase, _ string) { phases = append(phases, p) })
	if err != nil {
		t.Fatalf("migrate A->B: %v", err)
	}
	src, dst := a.meter.Stats().Sub(before[0]), b.meter.Stats().Sub(before[1])
	t.Logf("cold A->B: source %d TPM cmds, destination %d (%s), round trips %d+%d", src.Total, dst.Total, dst, res.RoundTrips.Before, res.RoundTrips.After)
	if src.Total != 0 || dst.Total > 12 || res.Warm || res.RoundTrips.Before != 2 || res.RoundTrips.After != 1 {
		t.Fatalf("cold budget: src %d, dst %d, warm %v, round trips %+v", src.Total, dst.Total, res.Warm, res.RoundTrips)
	}
	if len(phases) != 5 {
		t.Fatalf("phases %v", phases)
	}
	if got := b.guestUnseal(vm); !bytes.Equal(got, secret) {
		t.Fatalf("unsealed %q on B, want %q", got, secret)
	}
	f.checkSingleOwner(vm, "host-b")
	if _, gen, _ := b.keys.Get(ctx, vm); gen != 2 {
		t.Fatalf("generation on B = %d, want 2", gen)
	}

	// Back to A: B's evidence of A is cold, A->B again would be warm.
	if _, err := b.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-a"}, nil); err != nil {
		t.Fatalf("migrate B->A: %v", err)
	}
	if got := a.guestUnseal(vm); !bytes.Equal(got, secret) {
		t.Fatalf("unsealed %q back on A", got)
	}
	f.checkSingleOwner(vm, "host-a")
	before = [2]vtpm.Stats{a.meter.Stats(), b.meter.Stats()}
	res, err = a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil)
	if err != nil {
		t.Fatalf("warm A->B: %v", err)
	}
	src, dst = a.meter.Stats().Sub(before[0]), b.meter.Stats().Sub(before[1])
	t.Logf("warm A->B: source %d TPM cmds, destination %d (%s), round trips %d+%d", src.Total, dst.Total, dst, res.RoundTrips.Before, res.RoundTrips.After)
	if !res.Warm || src.Total != 0 || dst.Total > 6 || res.RoundTrips.Before != 1 || res.RoundTrips.After != 1 {
		t.Fatalf("warm budget: warm %v src %d dst %d round trips %+v", res.Warm, src.Total, dst.Total, res.RoundTrips)
	}
	if _, gen, _ := b.keys.Get(ctx, vm); gen != 4 {
		t.Fatalf("generation after three moves = %d, want 4", gen)
	}
	if got := b.guestUnseal(vm); !bytes.Equal(got, secret) {
		t.Fatalf("unsealed %q after three moves", got)
	}
	// G1 across both agents: no form of the VM key in any file either host
	// wrote (key stores, ledgers, audit logs, hypervisor state and logs), in
	// their logs, or in anything that crossed the wire.
	forms := map[string][]byte{"raw": raw, "hex": []byte(pass), "HEX": []byte(strings.ToUpper(string(pass))),
		"base64": []byte(base64.StdEncoding.EncodeToString(raw)), "base64url": []byte(base64.RawURLEncoding.EncodeToString(raw))}
	scanned := 0
	for _, h := range []*host{a, b} {
		blobs := map[string][]byte{h.name + " logs": h.logs.Bytes()}
		for i, m := range h.wire.msgs {
			blobs[fmt.Sprintf("%s wire message %d (%s)", h.name, i, m.Method)] = m.Body
		}
		_ = filepath.WalkDir(h.dir, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				if b, err := os.ReadFile(p); err == nil {
					blobs[p] = b
				}
			}
			return nil
		})
		for where, blob := range blobs {
			scanned++
			for form, enc := range forms {
				if bytes.Contains(blob, enc) {
					t.Errorf("G1: VM key (%s) found in %s", form, where)
				}
			}
		}
	}
	t.Logf("G1 scan: %d files, logs and wire messages of both agents", scanned)
	if a.audit.count("key-release") != 2 || b.audit.count("key-received") != 2 || b.audit.count("migration-commit") != 3 { // 2 as destination, 1 as source
		t.Fatalf("audit: A released %d, B received %d, B committed %d", a.audit.count("key-release"), b.audit.count("key-received"), b.audit.count("migration-commit"))
	}
}

func TestRefusedDestinationReceivesNoKeyBytes(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, c := f.addHost("host-a", goodLog), f.addHost("host-c", badLog)
	vm := a.createVM("vm1")
	pass := a.passphrase(vm)
	raw, _ := hex.DecodeString(pass)

	_, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-c"}, nil)
	var re *attest.RefusalError
	if !errors.Is(err, migrate.ErrRefused) || !errors.As(err, &re) || re.Rule != attest.RulePCRPolicy {
		t.Fatalf("migrate to a host with a tampered boot: %v, want ErrRefused by rule pcr-policy", err)
	}
	t.Logf("refusal: %v", err)
	if !strings.Contains(err.Error(), "host-c") {
		t.Fatalf("refusal does not name the host: %v", err)
	}
	if m := c.wire.methods(); len(m) != 2 || m[0] != "Evidence" {
		t.Fatalf("C saw %v, want only the evidence exchange", m)
	}
	for _, msg := range c.wire.msgs {
		for _, form := range [][]byte{raw, []byte(pass), []byte(base64.StdEncoding.EncodeToString(raw))} {
			if bytes.Contains(msg.Body, form) {
				t.Fatalf("key bytes reached host-c in %s", msg.Method)
			}
		}
	}
	if ok, _ := c.hyp.HasSecret(ctx, vm); ok {
		t.Fatal("a secret was defined on host-c")
	}
	pend, _ := filepath.Glob(filepath.Join(c.dir, "keys", "*.pending"))
	if len(pend) != 0 {
		t.Fatalf("pending keys on host-c: %v", pend)
	}
	if a.audit.count("key-release-refused") != 1 {
		t.Fatal("refusal not audited")
	}
	f.hosts = map[string]*host{"host-a": a, "host-c": c}
	f.checkSingleOwner(vm, "host-a")
}

func TestHypervisorFailureAborts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	vm := a.createVM("vm1")
	a.guestSeal(vm, []byte("s1"))
	a.hyp.FailNextMigrate = errors.New("injected: job 'migration out' unexpectedly failed")
	_, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil)
	if !errors.Is(err, migrate.ErrHypervisor) {
		t.Fatalf("got %v, want ErrHypervisor", err)
	}
	f.checkSingleOwner(vm, "host-a")
	if ok, _ := b.hyp.HasSecret(ctx, vm); ok {
		t.Fatal("B kept the secret after an abort")
	}
	if _, gen, _ := a.keys.Get(ctx, vm); gen != 1 {
		t.Fatalf("A's generation changed to %d", gen)
	}
	if got := a.guestUnseal(vm); string(got) != "s1" {
		t.Fatalf("unseal on A after the abort: %q", got)
	}
	// The retry succeeds at the same generation: the abort burnt nothing.
	if _, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil); err != nil {
		t.Fatalf("retry: %v", err)
	}
	f.checkSingleOwner(vm, "host-b")
}

func TestReplayAndStaleGenerationRefused(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	vm := a.createVM("vm1")
	if _, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil); err != nil {
		t.Fatal(err)
	}
	var prepare []byte
	for _, m := range b.wire.msgs {
		if m.Method == "Prepare" {
			prepare = m.Body
		}
	}
	req, err := migrate.DecodePrepare(prepare)
	if err != nil {
		t.Fatalf("captured Prepare does not decode: %v", err)
	}
	if _, err := b.node.Prepare(ctx, req); !errors.Is(err, migrate.ErrReplay) {
		t.Fatalf("replayed Prepare: %v, want ErrReplay", err)
	}
	// The same message under a fresh transaction id: the AEAD binding fails.
	req.TxID = strings.Repeat("ab", 16)
	if _, err := b.node.Prepare(ctx, req); !errors.Is(err, vtpm.ErrWrongKey) {
		t.Fatalf("Prepare with a rewritten transaction id: %v, want ErrWrongKey", err)
	}
	// An old copy of the VM (generation 1 -> 2 again) offered to B, which holds 2.
	f.checkSingleOwner(vm, "host-b")
	k, _ := vtpm.NewVMKey(nil)
	if err := b.keys.PutPending(ctx, vm, strings.Repeat("cd", 16), 2, k); !errors.Is(err, vtpm.ErrStaleGeneration) {
		t.Fatalf("stale generation: %v", err)
	}
	if _, err := migrate.DecodePrepare(append(prepare, '}')); !errors.Is(err, migrate.ErrBadMessage) {
		t.Fatalf("garbage Prepare: %v", err)
	}
}

func TestConcurrentMigrationsOfOneVM(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a := f.addHost("host-a", goodLog)
	f.addHost("host-b", goodLog)
	f.addHost("host-d", goodLog)
	vm := a.createVM("vm1")
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, dest := range []string{"host-b", "host-d"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: dest}, nil)
		}()
	}
	wg.Wait()
	won := 0
	for _, err := range errs {
		if err == nil {
			won++
		} else if !errors.Is(err, migrate.ErrBusy) && !errors.Is(err, migrate.ErrNotOwner) {
			t.Fatalf("loser's error is not clear: %v", err)
		} else {
			t.Logf("loser: %v", err)
		}
	}
	if won != 1 {
		t.Fatalf("%d migrations won: %v", won, errs)
	}
	owner := "host-b"
	if errs[0] != nil {
		owner = "host-d"
	}
	f.checkSingleOwner(vm, owner)
}

func TestMain(m *testing.M) {
	if err := os.MkdirAll("/tmp", 0o1777); err != nil {
		panic(err)
	}
	os.Exit(m.Run())
}

// TestReconcileDuringOwnMigration: the daemon's recovery loop may run while
// the same node is migrating (the VM still runs on the source until the
// hypervisor commits). It must leave that transaction alone, or it aborts
// a migration that the hypervisor then completes (VM on B, key only on A).
func TestReconcileDuringOwnMigration(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	vm := a.createVM("vm1")
	var recErr [2]error
	a.hyp.BeforeMigrateCommit = func() error {
		recErr[0] = a.node.Reconcile(ctx)
		recErr[1] = b.node.Reconcile(ctx)
		return nil
	}
	if _, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil); err != nil {
		t.Fatalf("migration with a recovery tick in the middle: %v", err)
	}
	t.Logf("reconcile during the migration: source %v; destination %v", recErr[0], recErr[1])
	if recErr[0] != nil {
		t.Fatalf("source reconcile touched its own in-flight transaction: %v", recErr[0])
	}
	f.checkSingleOwner(vm, "host-b")
}

// TestKeyProofMismatchAborts: a destination that cannot prove it holds the
// key that was sent (here: a proof altered on the way back, as a
// destination holding another key would send) is refused before the
// hypervisor moves anything; the VM keeps running on the source.
func TestKeyProofMismatchAborts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	vm := a.createVM("vm1")
	f.tamperPrepare = func(r *migrate.PrepareResponse) {
		for id := range r.Proofs {
			r.Proofs[id][0] ^= 1
		}
	}
	_, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil)
	if !errors.Is(err, migrate.ErrKeyProof) {
		t.Fatalf("got %v, want ErrKeyProof", err)
	}
	if st := a.hyp.Stats(); st.MigrationsOut != 0 || st.MigrationsFailed != 0 {
		t.Fatalf("the hypervisor was asked to migrate: %+v", st)
	}
	if ok, _ := b.hyp.HasSecret(ctx, vm); ok {
		t.Fatal("host-b kept the secret after the abort")
	}
	f.checkSingleOwner(vm, "host-a")
	// Untampered, the same migration goes through.
	f.tamperPrepare = nil
	if _, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil); err != nil {
		t.Fatalf("migration after the refused one: %v", err)
	}
	f.checkSingleOwner(vm, "host-b")
}
