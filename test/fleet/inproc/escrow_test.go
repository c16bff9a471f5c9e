package inproc_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/escrow"
	"github.com/vtpmm/vtpmm/migrate/recovery"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
	"github.com/vtpmm/vtpmm/vtpm"
)

// custodians are three offline custodians (X25519 age keys), k = 2.
type custodians struct {
	cfg   escrow.Config
	files map[string]string // name -> identity file
}

func newCustodians(t testing.TB) custodians {
	t.Helper()
	dir := t.TempDir()
	c := custodians{cfg: escrow.Config{Threshold: 2}, files: map[string]string{}}
	for _, name := range []string{"alice", "bob", "carol"} {
		id, err := age.GenerateX25519Identity()
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name+".key")
		if err := os.WriteFile(p, []byte("# "+name+"\n"+id.String()+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		c.files[name] = p
		c.cfg.Custodians = append(c.cfg.Custodians, escrow.CustodianConfig{Name: name, Recipients: []string{id.Recipient().String()}})
	}
	return c
}

// identities parses the named custodians' identity files, as vtpmctl
// restore --identity does.
func (c custodians) identities(t *testing.T, names ...string) []*escrow.Identity {
	t.Helper()
	var out []*escrow.Identity
	for _, n := range names {
		f, err := os.Open(c.files[n])
		if err != nil {
			t.Fatal(err)
		}
		ids, err := escrow.ParseIdentities(c.files[n], f, nil)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, ids...)
	}
	return out
}

func escrowFleet(t *testing.T, c custodians, backupDir, interval string, cfg inproc.Config) *inproc.Fleet {
	t.Helper()
	cfg.Configure = func(_ string, dc *daemon.Config) {
		dc.Escrow = c.cfg
		dc.Backup = daemon.BackupConfig{Dir: backupDir, Keep: 2, Interval: interval}
	}
	return newFleetWith(t, cfg)
}

// keyForms are the encodings of a VM key a leak would take: its raw bytes
// and the passphrase swtpm gets (hex), in hex of both cases and base64.
func keyForms(t *testing.T, h *inproc.Host, vm string) map[string][]byte {
	t.Helper()
	k, _, err := h.Daemon().Host().Keys().Get(context.Background(), vm)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Destroy()
	out := map[string][]byte{}
	_ = k.WithPassphrase(func(pass []byte) error {
		raw, err := hex.DecodeString(string(pass))
		if err != nil {
			t.Fatal(err)
		}
		out["passphrase"] = bytes.Clone(pass)
		out["raw"] = raw
		out["HEX"] = []byte(strings.ToUpper(string(pass)))
		out["base64"] = []byte(base64.StdEncoding.EncodeToString(raw))
		out["base64 raw url"] = []byte(base64.RawURLEncoding.EncodeToString(raw))
		return nil
	})
	return out
}

// TestBackupCostsNoTPM: 'vtpmctl backup VM... -o DIR' on real daemons
// writes one bundle per VM with 0 host TPM commands (the vault key is in
// memory), each bundle opens with 2 of the 3 custodians and holds the VM's
// generation and state, no bundle contains the VM key in any encoding
// (G1), and backup.keep prunes old bundles.
func TestBackupCostsNoTPM(t *testing.T) {
	t.Parallel()
	c := newCustodians(t)
	dir := t.TempDir()
	f := escrowFleet(t, c, filepath.Join(dir, "scheduled"), "1s", inproc.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	a := f.InProcHost(fleet.HostA)
	var vms []fleet.VM
	for _, name := range []string{"bk-1", "bk-2", "bk-3"} {
		vm, err := f.CreateVM(ctx, fleet.HostA, name)
		if err != nil {
			t.Fatal(err)
		}
		vms = append(vms, vm)
	}
	out := filepath.Join(dir, "out")
	tpm0 := a.Daemon().Host().Meter().Stats()
	rep, err := a.Admin().Backup(ctx, adminapi.BackupRequest{VMs: []string{"bk-1", "bk-2", vms[2].UUID}, Dir: out})
	cmds := a.Daemon().Host().Meter().Stats().Sub(tpm0)
	if err != nil {
		t.Fatal(err)
	}
	if cmds.Total != 0 || rep.TPMCommands != 0 {
		t.Errorf("backup of %d VMs: %d host TPM commands (report: %d), want 0", len(vms), cmds.Total, rep.TPMCommands)
	}
	if rep.Failed() != 0 || len(rep.Items) != 3 {
		t.Fatalf("backup report: %+v", rep)
	}
	t.Logf("backup of %d VMs: %s, %d host TPM commands", len(vms), rep.Took, cmds.Total)
	for i, it := range rep.Items {
		b, err := os.ReadFile(it.Path)
		if err != nil {
			t.Fatal(err)
		}
		if st, err := os.Stat(it.Path); err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, %v", it.Path, st.Mode(), err)
		}
		for name, s := range keyForms(t, a, vms[i].UUID) {
			if bytes.Contains(b, s) {
				t.Errorf("G1: the VM key (%s) is in the bundle %s", name, it.Path)
			}
		}
		o, err := escrow.Open(ctx, b, vms[i].UUID, c.identities(t, "bob", "carol"), escrow.OpenOptions{})
		if err != nil {
			t.Fatalf("open %s with 2 of 3: %v", it.Path, err)
		}
		if o.Header.Generation != 1 || o.Header.SourceHost != fleet.HostA || o.Header.VM.Name != vms[i].Name || len(o.State) == 0 {
			t.Errorf("bundle header %+v, %d state bytes", o.Header, len(o.State))
		}
		k, _, _ := a.Daemon().Host().Keys().Get(ctx, vms[i].UUID)
		if !o.Key().Equal(k) {
			t.Errorf("bundle of %s does not hold the VM's key", vms[i].Name)
		}
		k.Destroy()
		o.Destroy()
	}
	// backup.keep = 2: a third backup prunes the oldest.
	for range 2 {
		if _, err := a.Admin().Backup(ctx, adminapi.BackupRequest{All: true, Dir: out}); err != nil {
			t.Fatal(err)
		}
	}
	files, err := escrow.Layout{Dir: out}.List(vms[0].UUID)
	if err != nil || len(files) != 2 {
		t.Errorf("after 3 backups with keep 2: %d bundles (%v)", len(files), err)
	}
	// Without a directory given, backup.dir.
	if rep, err := a.Admin().Backup(ctx, adminapi.BackupRequest{VMs: []string{"bk-1"}}); err != nil || !strings.HasPrefix(rep.Items[0].Path, filepath.Join(dir, "scheduled")) {
		t.Errorf("backup to backup.dir: %+v, %v", rep, err)
	}
	// backup.interval (1s here): the schedule writes every owned VM's
	// bundle into backup.dir by itself, and keeps 2 per VM.
	deadline := time.Now().Add(30 * time.Second)
	for _, vm := range vms {
		for {
			files, err := escrow.Layout{Dir: filepath.Join(dir, "scheduled")}.List(vm.UUID)
			if err == nil && len(files) == 2 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the schedule wrote %d bundles of %s (want 2 kept), %v", len(files), vm.Name, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
}

// TestRestoreAfterHostTPMLoss: a VM's owner dies with its TPM (daemon
// killed, host TPM state wiped) and is retired; the VM is restored from
// its bundle onto another host with 2 of 3 custodians; it starts there
// and the tenant's sealed secret unseals. Before, restores with k-1
// custodians, a tampered bundle, another VM's bundle, to an untrusted host
// and to an unenrolled host are refused, each with its rule, and nothing
// changed; after, the replayed older bundle is refused.
func TestRestoreAfterHostTPMLoss(t *testing.T) {
	t.Parallel()
	c := newCustodians(t)
	dir := t.TempDir()
	f := escrowFleet(t, c, dir, "", inproc.Config{Hosts: []inproc.HostSpec{
		{Name: fleet.HostA}, {Name: fleet.HostB}, {Name: fleet.HostC, Tampered: true}, {Name: "host-d"}}, EnrollLast: true})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	a, b := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB)
	db, err := f.CreateVM(ctx, fleet.HostB, "db")
	if err != nil {
		t.Fatal(err)
	}
	web, err := f.CreateVM(ctx, fleet.HostB, "web")
	if err != nil {
		t.Fatal(err)
	}
	want, err := b.TenantSecret(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := b.Admin().Backup(ctx, adminapi.BackupRequest{All: true})
	if err != nil || rep.Failed() != 0 {
		t.Fatalf("backup: %+v, %v", rep, err)
	}
	bundleOf := map[string][]byte{}
	for _, it := range rep.Items {
		if bundleOf[it.UUID], err = os.ReadFile(it.Path); err != nil {
			t.Fatal(err)
		}
	}
	op := f.Operator()
	r := &recovery.Restorer{Admin: a.Admin(), Registry: op}
	two := c.identities(t, "alice", "carol")
	restore := func(bundle []byte, vm, dest string, ids []*escrow.Identity) (recovery.Report, error) {
		return r.Restore(ctx, recovery.Request{Bundle: bundle, Identities: ids, VM: vm, Dest: dest})
	}
	unchanged := func(what string) {
		t.Helper()
		v, err := op.VMs(ctx, db.UUID)
		if rec := v.VMs[db.UUID]; err != nil || rec.Owner != fleet.HostB || rec.Generation != 1 || rec.Tx != nil {
			t.Errorf("%s: the registry shows %+v (%v), want host-b at generation 1, no transaction", what, rec, err)
		}
		if _, _, err := a.Daemon().Host().Keys().Get(ctx, db.UUID); err == nil {
			t.Errorf("%s: host-a holds a key of the VM", what)
		}
		if _, err := os.Stat(a.Daemon().Host().Layout().VMState(db.UUID)); err == nil {
			t.Errorf("%s: host-a has a vTPM state of the VM", what)
		}
	}

	// The owner is alive: refused.
	if _, err := restore(bundleOf[db.UUID], db.UUID, fleet.HostA, two); !errors.Is(err, escrow.ErrOwnerActive) {
		t.Fatalf("restore while host-b lives: %v, want ErrOwnerActive", err)
	} else {
		t.Logf("owner alive: %v", err)
	}
	unchanged("owner alive")
	// A draining owner: only with --force (the new generation would fence
	// its copy).
	if err := op.SetState(ctx, fleet.HostB, registry.StateDraining); err != nil {
		t.Fatal(err)
	}
	if _, err := restore(bundleOf[db.UUID], db.UUID, fleet.HostA, two); !errors.Is(err, escrow.ErrOwnerActive) || !strings.Contains(err.Error(), "force") {
		t.Errorf("restore while host-b drains, without --force: %v, want ErrOwnerActive naming --force", err)
	}
	unchanged("owner draining")
	if err := op.SetState(ctx, fleet.HostB, registry.StateActive); err != nil {
		t.Fatal(err)
	}

	// Disaster: host-b and its TPM are gone.
	if err := b.LoseTPM(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	var ret recovery.RetireReport
	for {
		ret, err = recovery.Retire(ctx, op, fleet.HostB, false)
		if err == nil || !errors.Is(err, registry.ErrHostLive) || time.Now().After(deadline) {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if err != nil || len(ret.VMs) != 2 {
		t.Fatalf("retire host-b: %+v, %v", ret, err)
	}

	// An enrolled host relaying a restore the operator did not open in the
	// registry (a compromised host pushing a key): rule restore, before
	// anything is written.
	att, err := a.Admin().RestoreAttest(ctx, fleet.HostA)
	if err != nil {
		t.Fatal(err)
	}
	forged, err := vtpm.NewVMKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer forged.Destroy()
	pr, err := migrate.SealBatch(rand.Reader, att.MKPublic, att.EvidenceDigest, "00112233445566778899aabbccddeeff", att.Source, fleet.HostA,
		[]migrate.TxVM{{UUID: db.UUID, Name: db.Name, Generation: 2}}, map[string]vtpm.VMKey{db.UUID: forged})
	if err != nil {
		t.Fatal(err)
	}
	blob := []byte("forged vTPM state")
	sum := sha256.Sum256(blob)
	err = a.Admin().RestorePrepare(ctx, &migrate.RestoreRequest{Prepare: *pr,
		States: []migrate.RestoredState{{UUID: db.UUID, Bundle: strings.Repeat("ab", 16), SHA256: sum[:], Blob: blob}}}, &migrate.PrepareResponse{})
	if !errors.Is(err, migrate.ErrDenied) || !strings.Contains(err.Error(), "rule restore") {
		t.Errorf("a restore without the registry's Begin: %v, want rule restore", err)
	} else {
		t.Logf("restore without the operator's Begin: %v", err)
	}
	unchanged("restore without the registry's Begin")

	// A restore open in the registry (the operator's Begin) and prepared on
	// host-a survives host-a's recovery (the relay keeps no ledger: the
	// registry decides); once the operator aborts it, recovery drops
	// everything it staged.
	openTx := "aabbccddeeff00112233445566778899"
	batch := registry.Batch{TxID: openTx, From: fleet.HostB, To: fleet.HostA, VMs: []registry.VMGen{{ID: db.UUID, Generation: 1}}}
	if _, err := op.Begin(ctx, batch); err != nil {
		t.Fatal(err)
	}
	if pr, err = migrate.SealBatch(rand.Reader, att.MKPublic, att.EvidenceDigest, openTx, att.Source, fleet.HostA,
		[]migrate.TxVM{{UUID: db.UUID, Name: db.Name, Generation: 2}}, map[string]vtpm.VMKey{db.UUID: forged}); err != nil {
		t.Fatal(err)
	}
	if err := a.Admin().RestorePrepare(ctx, &migrate.RestoreRequest{Prepare: *pr,
		States: []migrate.RestoredState{{UUID: db.UUID, Bundle: strings.Repeat("ab", 16), SHA256: sum[:], Blob: blob}}}, &migrate.PrepareResponse{}); err != nil {
		t.Fatalf("a restore the registry shows open: %v", err)
	}
	settle := func() {
		if err := a.Admin().HookReleased(ctx, adminapi.HookRequest{UUID: db.UUID, Name: db.Name}); err != nil {
			t.Fatal(err)
		}
	}
	settle()
	time.Sleep(3 * time.Second) // the settle runs 0.5 s after the trigger
	txState := func() string {
		info, err := a.Admin().VM(ctx, db.UUID)
		if err != nil {
			t.Fatal(err)
		}
		for _, tx := range info.Transactions {
			if tx.ID == openTx {
				return tx.State
			}
		}
		return "none"
	}
	if st := txState(); st != string(migrate.DstPending) {
		t.Fatalf("host-a's recovery during an open restore: transaction %s is %s, want %s", openTx, st, migrate.DstPending)
	}
	if _, err := op.Abort(ctx, batch); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		settle()
		if txState() == string(migrate.DstAborted) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("host-a kept the aborted restore's pending key")
		}
	}
	unchanged("an aborted restore")

	refusals := []struct {
		name   string
		bundle []byte
		vm     string
		dest   string
		ids    []*escrow.Identity
		want   error
	}{
		{"k-1 custodians", bundleOf[db.UUID], db.UUID, fleet.HostA, c.identities(t, "bob"), escrow.ErrNotEnoughShares},
		{"tampered bundle", flipLast(bundleOf[db.UUID]), db.UUID, fleet.HostA, two, escrow.ErrTampered},
		{"another VM's bundle", bundleOf[web.UUID], db.UUID, fleet.HostA, two, escrow.ErrWrongVM},
		{"untrusted host", bundleOf[db.UUID], db.UUID, fleet.HostC, two, migrate.ErrRefused},
		{"unenrolled host", bundleOf[db.UUID], db.UUID, "host-d", two, registry.ErrNotEnrolled},
		{"retired host", bundleOf[db.UUID], db.UUID, fleet.HostB, two, recovery.ErrDestNotActive},
	}
	for _, tc := range refusals {
		_, err := restore(tc.bundle, tc.vm, tc.dest, tc.ids)
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		} else {
			t.Logf("%s: refused: %v", tc.name, err)
		}
		unchanged(tc.name)
	}

	// 2 of 3 custodians restore it onto host-a.
	tpm0 := a.Daemon().Host().Meter().Stats()
	got, err := restore(bundleOf[db.UUID], db.UUID, fleet.HostA, two)
	cmds := a.Daemon().Host().Meter().Stats().Sub(tpm0)
	if err != nil {
		t.Fatalf("restore with alice and carol: %v", err)
	}
	names := map[string]int{}
	for cc, n := range cmds.ByCode {
		names[vtpm.CommandName(cc)] = n
	}
	t.Logf("restore: %s, %d host TPM commands on the destination (its own evidence included: warm %v): %v", got.Took, cmds.Total, got.Warm, names)
	if got.Generation != 2 || got.PreviousOwner != fleet.HostB {
		t.Errorf("restore report %+v", got)
	}
	v, err := op.VMs(ctx, db.UUID)
	if rec := v.VMs[db.UUID]; err != nil || rec.Owner != fleet.HostA || rec.Generation != 2 {
		t.Errorf("registry after the restore: %+v, %v", rec, err)
	}
	hyp := a.Fake()
	if err := hyp.DefineVTPMDomain(ctx, hypervisor.Domain{UUID: db.UUID, Name: db.Name}, a.Daemon().Host().Layout().VMState(db.UUID)); err != nil {
		t.Fatal(err)
	}
	if err := hyp.StartDomain(ctx, db.UUID); err != nil {
		t.Fatal(err)
	}
	if s, err := a.TenantSecret(ctx, db); err != nil || s != want {
		t.Fatalf("the tenant's secret after the restore: %q, %v; want %q", s, err, want)
	}

	// The old bundle again, after the newer restore: stale.
	if _, err := restore(bundleOf[db.UUID], db.UUID, fleet.HostA, two); !errors.Is(err, escrow.ErrStaleBundle) {
		t.Errorf("replayed older bundle: %v, want ErrStaleBundle", err)
	} else {
		t.Logf("replayed older bundle: %v", err)
	}
}

// flipLast changes the bundle's last byte (its vTPM state).
func flipLast(b []byte) []byte {
	out := bytes.Clone(b)
	out[len(out)-1] ^= 0x40
	return out
}
