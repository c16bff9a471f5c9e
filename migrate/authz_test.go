package migrate_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"slices"
	"testing"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/errclass"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
	"github.com/vtpmm/vtpmm/vtpm"
)

// The destination's authorisation (migrate/authz.go), attacked as issue 10
// tried it: each case first shows the honest twin, then the attack, then
// that nothing on the destination changed.

func newTx(t testing.TB) string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// forge sends to `to`, as `from`, a Prepare for the VMs at gen with fresh
// random keys, built as any holder of keys can build one (the transfer key
// wrapped for to's migration key). It returns the request and the error.
func (f *fleet) forge(from, to *host, gen uint64, vms ...string) (*migrate.PrepareRequest, error) {
	t := f.t
	t.Helper()
	keys := map[string]vtpm.VMKey{}
	var txvms []migrate.TxVM
	for _, vm := range vms {
		k, err := vtpm.NewVMKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		defer k.Destroy()
		keys[vm] = k
		txvms = append(txvms, migrate.TxVM{UUID: vm, Generation: gen})
	}
	req := &migrate.PrepareRequest{Version: migrate.ProtocolVersion, TxID: newTx(t), Source: from.name, Dest: to.name,
		EvidenceDigest: bytes.Repeat([]byte{7}, 32)}
	if err := migrate.ForgePrepare(rand.Reader, to.ident.MK.Public, req, txvms, keys); err != nil {
		t.Fatal(err)
	}
	_, err := (&testPeer{from: from, to: to}).Prepare(context.Background(), req)
	return req, err
}

// wantDenied checks that err is the destination's refusal by rule.
func wantDenied(t testing.TB, what string, err error, rule string) {
	t.Helper()
	var ae *migrate.AuthzError
	if !errors.As(err, &ae) || ae.Rule != rule || !errors.Is(err, migrate.ErrDenied) || !errors.Is(err, errclass.Denied) {
		t.Fatalf("%s: got %v, want the destination's refusal by rule %s", what, err, rule)
	}
	t.Logf("%s: %v", what, err)
}

// untouched checks that a refused Prepare left nothing on h.
func (h *host) untouched(t testing.TB, req *migrate.PrepareRequest, ledgerBefore int) {
	t.Helper()
	all, _ := h.ledger.All()
	if len(all) != ledgerBefore {
		t.Fatalf("%s: the ledger went from %d to %d transactions", h.name, ledgerBefore, len(all))
	}
	if _, err := h.ledger.Get(req.TxID); !errors.Is(err, migrate.ErrUnknownTx) {
		t.Fatalf("%s: the refused transaction is in the ledger: %v", h.name, err)
	}
	for _, w := range req.VMs {
		if files := h.pendingKeyFiles(w.UUID); len(files) > 0 {
			t.Fatalf("%s: a pending key was stored: %v", h.name, files)
		}
	}
}

func ledgerLen(h *host) int {
	all, _ := h.ledger.All()
	return len(all)
}

// TestPrepareAuthorisation: attacks 1 and 2 of issue 10 and their
// variants, in registry mode none.
func TestPrepareAuthorisation(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, b, d := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog), f.addHost("host-d", goodLog)
	u := f.addHostEnrolled("host-u", goodLog, false)
	vm := a.createVM("vm1")
	secret := []byte("tenant secret under attack")
	a.guestSeal(vm, secret)

	// The honest twin: A -> D -> A, and A -> B -> A (B is a former holder).
	for _, hop := range [][2]*host{{a, d}, {d, a}, {a, b}, {b, a}} {
		if _, err := hop[0].node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: hop[1].name}, nil); err != nil {
			t.Fatalf("honest migration %s -> %s: %v", hop[0].name, hop[1].name, err)
		}
	}
	f.checkSingleOwner(vm, "host-a")
	_, genA, err := a.keys.Get(ctx, vm)
	if err != nil || genA != 5 {
		t.Fatalf("A holds generation %d (%v), want 5", genA, err)
	}
	passA := a.passphrase(vm)

	// Attack 1: an unenrolled host sends a Prepare for A's VM to D at
	// generation 2^64-1; then an enrolled one does; then one far above
	// D's high-water mark.
	n := ledgerLen(d)
	req, err := f.forge(u, d, math.MaxUint64, vm)
	wantDenied(t, "unenrolled sender at 2^64-1", err, migrate.RuleSenderEnrolled)
	d.untouched(t, req, n)
	req, err = f.forge(b, d, math.MaxUint64, vm)
	wantDenied(t, "enrolled sender at 2^64-1", err, migrate.RuleGeneration)
	d.untouched(t, req, n)
	req, err = f.forge(b, d, registry.MaxGeneration, vm)
	wantDenied(t, "enrolled sender far above the high-water mark", err, migrate.RuleGeneration)
	d.untouched(t, req, n)
	// The owner still migrates there, and back.
	for _, hop := range [][2]*host{{a, d}, {d, a}} {
		if _, err := hop[0].node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: hop[1].name}, nil); err != nil {
			t.Fatalf("after the attack, %s -> %s: %v", hop[0].name, hop[1].name, err)
		}
	}
	f.checkSingleOwner(vm, "host-a")
	_, genA, _ = a.keys.Get(ctx, vm)
	passA = a.passphrase(vm)

	// Attack 2: the former holder B sends A a Prepare for A's running VM
	// at the next generation, with a key of its own.
	n = ledgerLen(a)
	req, err = f.forge(b, a, genA+1, vm)
	wantDenied(t, "former holder overwrites the owner's key", err, migrate.RuleOwnedHere)
	a.untouched(t, req, n)
	if _, g, err := a.keys.Get(ctx, vm); err != nil || g != genA || a.passphrase(vm) != passA {
		t.Fatalf("A's key changed: generation %d (%v)", g, err)
	}
	// Attack 3's symptom: the owner's secret is still there and right: a
	// cold start of the VM works and the tenant unseals.
	if err := a.hyp.DestroyDomain(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if err := a.hyp.StartDomain(ctx, vm); err != nil {
		t.Fatalf("cold start of A's VM after the refused Prepare: %v", err)
	}
	if got := a.guestUnseal(vm); !bytes.Equal(got, secret) {
		t.Fatalf("tenant unsealed %q", got)
	}

	// A VM that runs on the destination without being owned there: its
	// secret is never replaced.
	other := d.createVM("vm-runs-on-d")
	if err := d.keys.Delete(ctx, other); err != nil {
		t.Fatal(err)
	}
	n = ledgerLen(d)
	req, err = f.forge(b, d, 2, other)
	wantDenied(t, "Prepare for a VM that runs on the destination", err, migrate.RuleRunsHere)
	d.untouched(t, req, n)
	if d2, _ := d.hyp.Domain(ctx, other); d2.State != hypervisor.StateRunning {
		t.Fatalf("the VM on D: %s", d2.State)
	}
}

// TestAbortUndoesOnlyItsOwn: a Prepare that passes the authorisation and
// then fails (the second VM of the batch is stale on the destination)
// drops its own pending key and leaves a secret it did not define.
func TestAbortUndoesOnlyItsOwn(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, d := f.addHost("host-a", goodLog), f.addHost("host-d", goodLog)
	vm1, vm2 := a.createVM("vm1"), a.createVM("vm2")
	// The honest twin: the batch moves to D and back.
	for _, hop := range [][2]*host{{a, d}, {d, a}} {
		if _, err := hop[0].node.Migrate(ctx, migrate.Request{VMs: []string{vm1, vm2}, Dest: hop[1].name}, nil); err != nil {
			t.Fatalf("honest batch %s -> %s: %v", hop[0].name, hop[1].name, err)
		}
	}
	// D has held vm2 far above A's generation (a restore, say), and its
	// hypervisor holds a secret for vm1 that no transaction defined.
	k, _ := vtpm.NewVMKey(rand.Reader)
	defer k.Destroy()
	if err := d.keys.Put(ctx, vm2, 50, k); err != nil {
		t.Fatal(err)
	}
	if err := d.keys.Delete(ctx, vm2); err != nil {
		t.Fatal(err)
	}
	if err := d.hyp.DefineSecret(ctx, vm1, []byte("the operator's secret")); err != nil {
		t.Fatal(err)
	}
	_, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm1, vm2}, Dest: "host-d"}, nil)
	if !errors.Is(err, vtpm.ErrStaleGeneration) {
		t.Fatalf("batch with a stale VM: %v, want ErrStaleGeneration", err)
	}
	if has, _ := d.hyp.HasSecret(ctx, vm1); !has {
		t.Fatal("the failed Prepare's abort removed a secret the transaction did not define")
	}
	for _, vm := range []string{vm1, vm2} {
		if files := d.pendingKeyFiles(vm); len(files) > 0 {
			t.Fatalf("pending key left on D: %v", files)
		}
	}
	if _, ok := d.node.Incoming(vm1); ok {
		t.Fatal("the failed transaction is still open on D")
	}
}

// TestInformationForEnrolledPeersOnly: Evidence, Status and Pull answer
// enrolled hosts only; Status tells a peer only about VMs of a
// transaction with it; an out-of-range PCR is a bad message.
func TestInformationForEnrolledPeersOnly(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, d := f.addHost("host-a", goodLog), f.addHost("host-d", goodLog)
	u := f.addHostEnrolled("host-u", goodLog, false)
	vm := a.createVM("vm1")
	res, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-d"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	nonce := bytes.Repeat([]byte{1}, 32)
	// Honest twins: A, enrolled, gets evidence, the transaction's status
	// with the VM running on D.
	if _, err := d.node.Evidence(ctx, &migrate.EvidenceRequest{Version: migrate.ProtocolVersion, Nonce: nonce, Source: "host-a"}); err != nil {
		t.Fatalf("evidence for an enrolled peer: %v", err)
	}
	st, err := d.node.Status(ctx, &migrate.StatusRequest{TxID: res.TxID, VMs: []string{vm}, From: "host-a"})
	if err != nil || !st.Known || !slices.Contains(st.Running, vm) {
		t.Fatalf("status for the transaction's peer: %+v %v", st, err)
	}
	// The unenrolled host gets nothing.
	_, err = d.node.Evidence(ctx, &migrate.EvidenceRequest{Version: migrate.ProtocolVersion, Nonce: nonce, Source: u.name})
	wantDenied(t, "evidence for an unenrolled host", err, migrate.RuleSenderEnrolled)
	_, err = d.node.Status(ctx, &migrate.StatusRequest{TxID: newTx(t), VMs: []string{vm}, From: u.name})
	wantDenied(t, "status for an unenrolled host", err, migrate.RuleSenderEnrolled)
	_, err = a.node.Pull(ctx, &migrate.PullRequest{Version: migrate.ProtocolVersion, Dest: u.name, VMs: []string{vm}})
	wantDenied(t, "pull by an unenrolled host", err, migrate.RuleSenderEnrolled)
	// An enrolled host learns nothing about VMs outside its transactions.
	st, err = d.node.Status(ctx, &migrate.StatusRequest{TxID: newTx(t), VMs: []string{vm}, From: "host-a"})
	if err != nil || st.Known || len(st.Running) != 0 || len(st.Stopped) != 0 {
		t.Fatalf("status of an unknown transaction told %+v (%v)", st, err)
	}
	// Nor about a VM it owns that does not run (only a domain this host
	// holds no key of is reported for an unknown transaction: Reunite).
	if err := d.hyp.DestroyDomain(ctx, vm); err != nil {
		t.Fatal(err)
	}
	st, err = d.node.Status(ctx, &migrate.StatusRequest{TxID: newTx(t), VMs: []string{vm}, From: "host-a"})
	if err != nil || st.Known || len(st.Running) != 0 || len(st.Stopped) != 0 {
		t.Fatalf("status of an unknown transaction told %+v (%v) about a VM owned here, shut off", st, err)
	}
	// Out-of-range PCRs and unknown banks are bad messages, not TPM errors.
	for _, pcrs := range []map[string][]int{{"sha256": {24}}, {"sha256": {-1}}, {"md5": {0}}} {
		req := &migrate.EvidenceRequest{Version: migrate.ProtocolVersion, Nonce: nonce, Source: "host-a", PCRs: toBanks(pcrs)}
		if _, err := d.node.Evidence(ctx, req); !errors.Is(err, migrate.ErrBadMessage) {
			t.Fatalf("evidence over PCRs %v: %v, want ErrBadMessage", pcrs, err)
		}
	}
}

// TestPrepareAuthorisationRegistry: with a registry, the destination
// accepts a Prepare only at exactly the generation after the registry's,
// from the registry's owner, with this transaction open to this host. The
// source's registry steps (lane REG) are played by the test's transport.
func TestPrepareAuthorisationRegistry(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	d := f.addHost("host-d", goodLog)
	reg := newFakeRegistry(t, "host-a", "host-b", "host-d")
	d.reg = reg.Client("host-d")
	d.restart()
	vm := a.createVM("vm1")
	if _, err := reg.Client("root").CreateVM(ctx, vm, "host-a"); err != nil {
		t.Fatal(err)
	}
	// The honest twin: the source opens the batch in the registry before
	// its Prepare and commits it before its Finish.
	f.onPrepare = func(from, to *host, r *migrate.PrepareRequest) error {
		batch := registry.Batch{TxID: r.TxID, From: from.name, To: to.name}
		for _, w := range r.VMs {
			batch.VMs = append(batch.VMs, registry.VMGen{ID: w.UUID, Generation: w.Generation - 1})
		}
		_, err := reg.Client(from.name).Begin(ctx, batch)
		return err
	}
	f.onFinish = func(from, to *host, r *migrate.FinishRequest) error {
		if len(r.Commit) == 0 {
			return nil
		}
		tx, err := from.ledger.Get(r.TxID)
		if err != nil {
			return err
		}
		batch := registry.Batch{TxID: r.TxID, From: from.name, To: to.name}
		for _, v := range tx.VMs {
			batch.VMs = append(batch.VMs, registry.VMGen{ID: v.UUID, Generation: v.Generation - 1})
		}
		_, err = reg.Client(from.name).Commit(ctx, batch)
		return err
	}
	if _, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-d"}, nil); err != nil {
		t.Fatalf("honest migration with the registry: %v", err)
	}
	f.checkSingleOwner(vm, "host-d")
	if _, err := d.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-a"}, nil); err != nil {
		t.Fatalf("honest migration back: %v", err)
	}
	f.onPrepare, f.onFinish = nil, nil

	// The registry shows A at generation 3. Forged Prepares to D:
	n := ledgerLen(d)
	req, err := f.forge(b, d, 4, vm)
	wantDenied(t, "a sender the registry does not show as the owner", err, migrate.RuleRegistry)
	d.untouched(t, req, n)
	req, err = f.forge(a, d, 4, vm)
	wantDenied(t, "the owner's Prepare without an open transaction", err, migrate.RuleRegistry)
	d.untouched(t, req, n)
	// A transaction open to another host.
	if _, err := reg.Client("host-a").Begin(ctx, registry.Batch{TxID: newTx(t), From: "host-a", To: "host-b", VMs: []registry.VMGen{{ID: vm, Generation: 3}}}); err != nil {
		t.Fatal(err)
	}
	req, err = f.forge(a, d, 4, vm)
	wantDenied(t, "a transaction open to another host", err, migrate.RuleRegistry)
	d.untouched(t, req, n)
	// The right transaction, the wrong generation.
	f.onPrepare = func(from, to *host, r *migrate.PrepareRequest) error {
		cur, err := reg.Client("root").VMs(ctx, vm)
		if err != nil || cur.VMs[vm].Tx == nil {
			return fmt.Errorf("registry: %+v %v", cur, err)
		}
		_, err = reg.Client("host-a").Abort(ctx, registry.Batch{TxID: cur.VMs[vm].Tx.ID, From: "host-a", To: "host-b", VMs: []registry.VMGen{{ID: vm, Generation: 3}}})
		if err == nil {
			_, err = reg.Client("host-a").Begin(ctx, registry.Batch{TxID: r.TxID, From: "host-a", To: "host-d", VMs: []registry.VMGen{{ID: vm, Generation: 3}}})
		}
		return err
	}
	req, err = f.forge(a, d, 5, vm)
	wantDenied(t, "the open transaction at a later generation", err, migrate.RuleRegistry)
	d.untouched(t, req, n)
}

func toBanks(m map[string][]int) map[attestBank][]int {
	out := map[attestBank][]int{}
	for k, v := range m {
		out[attestBank(k)] = v
	}
	return out
}

type attestBank = attest.Bank

// newFakeRegistry is an in-memory registry (registrytest.Fake) with the
// hosts enrolled by the operator.
func newFakeRegistry(t testing.TB, hosts ...string) *registrytest.Fake {
	t.Helper()
	reg := registrytest.NewFake()
	registrytest.Enroll(t, reg.Client("root"), hosts...)
	return reg
}

// TestRelayedEvidenceRefused is issue 10's attack 5: enrolled host B
// relays the evidence of enrolled host D (fresh, over A's own nonce) under
// its own name. The honest twin first: A migrates to B with B's evidence.
// Then, cold again, B answers A's Evidence with D's: refused by rule
// enrolled-host (D's AK is enrolled for host-d), before any Prepare.
func TestRelayedEvidenceRefused(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	f.maxAge = -1 // every migration is cold
	a, b, d := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog), f.addHost("host-d", goodLog)
	vm := a.createVM("vm1")
	for _, hop := range [][2]*host{{a, b}, {b, a}} {
		if _, err := hop[0].node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: hop[1].name}, nil); err != nil {
			t.Fatalf("honest migration %s -> %s: %v", hop[0].name, hop[1].name, err)
		}
	}
	for _, rename := range []bool{false, true} {
		f.onEvidence = func(from, to *host, r *migrate.EvidenceRequest, resp *migrate.EvidenceResponse) (*migrate.EvidenceResponse, error) {
			if to != b {
				return resp, nil
			}
			// B asks D for evidence over A's nonce, as B (enrolled at D).
			relayed, err := d.node.Evidence(ctx, &migrate.EvidenceRequest{Version: r.Version, Nonce: r.Nonce, PCRs: r.PCRs, Source: "host-b"})
			if err != nil || !rename {
				return relayed, err
			}
			ev, err := attest.DecodeEvidence(relayed.Evidence)
			if err != nil {
				return nil, err
			}
			ev.HostID = "host-b" // not under any TPM signature
			raw, err := ev.Encode()
			return &migrate.EvidenceResponse{Evidence: raw}, err
		}
		prepares := len(slices.DeleteFunc(b.wire.methods(), func(m string) bool { return m != "Prepare" }))
		_, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil)
		var re *attest.RefusalError
		if !errors.As(err, &re) || re.Rule != attest.RuleEnrolledHost || !errors.Is(err, migrate.ErrRefused) {
			t.Fatalf("relayed evidence (renamed %v): %v, want rule enrolled-host", rename, err)
		}
		t.Logf("relayed evidence (renamed %v): %v", rename, err)
		if n := len(slices.DeleteFunc(b.wire.methods(), func(m string) bool { return m != "Prepare" })); n != prepares {
			t.Fatal("a Prepare reached the relaying host")
		}
		f.checkSingleOwner(vm, "host-a")
	}
	f.onEvidence = nil
	if _, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil); err != nil {
		t.Fatalf("honest migration after the relays: %v", err)
	}
}
