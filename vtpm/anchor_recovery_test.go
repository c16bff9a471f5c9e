package vtpm_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

func TestAnchorInitRefusals(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, tpm := tpmtest.NewHost(t)
	h := newAnchorHostOn(t, tpm)
	a := h.init(t)
	first := a.Counter()
	if _, err := vtpm.InitAnchor(ctx, h.meter, h.vault, h.cfg, vtpm.Facts{}, vtpm.AnchorInitOptions{}); !errors.Is(err, vtpm.ErrAnchorExists) {
		t.Fatalf("second InitAnchor: %v, want ErrAnchorExists", err)
	}
	// The file disappears (the directory was replaced): refused, not re-created.
	if err := os.Remove(a.Path()); err != nil {
		t.Fatal(err)
	}
	if _, err := vtpm.OpenAnchor(ctx, h.meter, h.vault, h.cfg); !errors.Is(err, vtpm.ErrAnchorFileMissing) {
		t.Fatalf("OpenAnchor without the file: %v, want ErrAnchorFileMissing", err)
	}
	if _, err := vtpm.InitAnchor(ctx, h.meter, h.vault, h.cfg, vtpm.Facts{}, vtpm.AnchorInitOptions{}); !errors.Is(err, vtpm.ErrAnchorFileMissing) {
		t.Fatalf("InitAnchor without the file: %v, want ErrAnchorFileMissing", err)
	}

	// Another vault on the same TPM (a re-initialised host) cannot take the
	// index over silently; with Replace it can, and the counter goes on.
	other := newAnchorHostOn(t, tpm)
	if _, err := vtpm.InitAnchor(ctx, other.meter, other.vault, other.cfg, vtpm.Facts{}, vtpm.AnchorInitOptions{}); !errors.Is(err, vtpm.ErrAnchorConflict) {
		t.Fatalf("InitAnchor by another vault: %v, want ErrAnchorConflict", err)
	}
	b, err := vtpm.InitAnchor(ctx, other.meter, other.vault, other.cfg, vtpm.Facts{}, vtpm.AnchorInitOptions{Replace: true})
	if err != nil {
		t.Fatalf("InitAnchor with Replace: %v", err)
	}
	defer b.Close()
	if b.Counter() <= first {
		t.Fatalf("replaced index restarted at %d, the old one was at %d", b.Counter(), first)
	}
	// The first vault's anchor no longer opens the index.
	if _, _, err := vtpm.AcceptAnchorState(ctx, h.meter, h.vault, h.cfg, vtpm.Facts{}, acceptance(nil)); !errors.Is(err, vtpm.ErrAnchorConflict) {
		t.Fatalf("accept by the replaced vault: %v, want ErrAnchorConflict", err)
	}

	// An index with other attributes at the configured handle.
	idx := tpm2.TPMHandle(0x01307677)
	_, err = tpm2.NVDefineSpace{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{NVIndex: idx, NameAlg: tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, NT: tpm2.TPMNTOrdinary}, DataSize: 8}),
	}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	third := newAnchorHostOn(t, tpm)
	third.cfg.Index = idx
	if _, err := vtpm.InitAnchor(ctx, third.meter, third.vault, third.cfg, vtpm.Facts{}, vtpm.AnchorInitOptions{Replace: true}); !errors.Is(err, vtpm.ErrAnchorConflict) {
		t.Fatalf("InitAnchor over an ordinary index: %v, want ErrAnchorConflict", err)
	} else {
		t.Logf("foreign index: %v", err)
	}
	third.cfg.Index = 0x01500000 // platform range
	if _, err := vtpm.InitAnchor(ctx, third.meter, third.vault, third.cfg, vtpm.Facts{}, vtpm.AnchorInitOptions{}); err == nil {
		t.Fatal("InitAnchor outside the owner range succeeded")
	}
}

func acceptance(records *[]vtpm.AnchorAcceptRecord) vtpm.AnchorAcceptance {
	return vtpm.AnchorAcceptance{Operator: "alice", Reason: "owners confirmed with host-b",
		Audit: func(_ context.Context, r vtpm.AnchorAcceptRecord) error {
			if records != nil {
				*records = append(*records, r)
			}
			return nil
		}}
}

func TestAcceptAnchorStateIsExplicitAndAudited(t *testing.T) {
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
	migrateOut(t, h, a, vmA)
	a.Close()
	copyTree(t, backup, h.dir)
	if _, err := h.open(t).Check(ctx, h.facts(t)); !errors.Is(err, vtpm.ErrRollback) {
		t.Fatalf("restored: %v", err)
	}
	// Refused without an operator, a reason or an audit sink; refused when
	// the audit fails (and the file is untouched).
	for _, acc := range []vtpm.AnchorAcceptance{{}, {Operator: "alice", Reason: "x"}} {
		if _, _, err := vtpm.AcceptAnchorState(ctx, h.meter, h.vault, h.cfg, h.facts(t), acc); !errors.Is(err, vtpm.ErrAcceptIncomplete) {
			t.Fatalf("incomplete acceptance: %v", err)
		}
	}
	failing := acceptance(nil)
	failing.Audit = func(context.Context, vtpm.AnchorAcceptRecord) error { return errors.New("disk full") }
	if _, _, err := vtpm.AcceptAnchorState(ctx, h.meter, h.vault, h.cfg, h.facts(t), failing); err == nil {
		t.Fatal("acceptance without an audit record succeeded")
	}
	if _, err := h.open(t).Check(ctx, h.facts(t)); !errors.Is(err, vtpm.ErrRollback) {
		t.Fatalf("after a failed acceptance: %v", err)
	}

	// The operator removed VM A (another host owns it now) and accepts.
	if err := h.ks.Delete(ctx, vmA); err != nil {
		t.Fatal(err)
	}
	var recs []vtpm.AnchorAcceptRecord
	var b *vtpm.Anchor
	var rec vtpm.AnchorAcceptRecord
	var err error
	s := h.measure(t, func() {
		b, rec, err = vtpm.AcceptAnchorState(ctx, h.meter, h.vault, h.cfg, h.facts(t), acceptance(&recs))
	})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if len(recs) != 1 || rec.TPMCounter != rec.OldCounter+1 || rec.Holdings != 1 || s.Total != 1 {
		t.Fatalf("record %+v (%d audited), %s", rec, len(recs), s)
	}
	t.Logf("audit: %s", rec)
	if _, err := h.open(t).Check(ctx, h.facts(t)); err != nil {
		t.Fatalf("Check after acceptance: %v", err)
	}

	// A missing file can be accepted too.
	if err := os.Remove(b.Path()); err != nil {
		t.Fatal(err)
	}
	_, rec, err = vtpm.AcceptAnchorState(ctx, h.meter, h.vault, h.cfg, h.facts(t), acceptance(nil))
	if err != nil || rec.OldProblem == "" {
		t.Fatalf("accept a missing file: %+v, %v", rec, err)
	}
}

func TestAnchorFileFromAnotherTPMIsAhead(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newAnchorHost(t)
	a := h.init(t)
	for i := 0; i < 3; i++ {
		if _, err := a.Advance(ctx, nil); err != nil {
			t.Fatal(err)
		}
	}
	// The same data directory checked against a second TPM whose anchor
	// (made with the same vault key) is at a lower count.
	_, tpmB := tpmtest.NewHost(t)
	mB := vtpm.NewMeter(tpmB, vtpm.ProfileNone)
	otherDir := t.TempDir()
	b, err := vtpm.InitAnchor(ctx, mB, h.vault, vtpm.AnchorConfig{Dir: otherDir}, vtpm.Facts{}, vtpm.AnchorInitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	b.Close()
	c, err := vtpm.OpenAnchor(ctx, mB, h.vault, h.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Check(ctx, vtpm.Facts{}); !errors.Is(err, vtpm.ErrAnchorAhead) {
		t.Fatalf("Check against another TPM: %v, want ErrAnchorAhead", err)
	}
}

func TestAnchorCheckWithoutIndex(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newAnchorHost(t)
	if _, err := vtpm.OpenAnchor(ctx, h.meter, h.vault, h.cfg); !errors.Is(err, vtpm.ErrAnchorNotInitialized) {
		t.Fatalf("OpenAnchor on a new host: %v, want ErrAnchorNotInitialized", err)
	}
	a := h.init(t)
	// The TPM's owner (or a TPM clear) removes the index.
	name, err := tpm2.NVReadPublic{NVIndex: vtpm.DefaultAnchorIndex}.Execute(h.tpm)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.NVUndefineSpace{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: vtpm.DefaultAnchorIndex, Name: name.NVName},
	}).Execute(h.tpm); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Check(ctx, vtpm.Facts{}); !errors.Is(err, vtpm.ErrAnchorMissing) {
		t.Fatalf("Check without the index: %v, want ErrAnchorMissing", err)
	}
}

// BenchmarkAnchor reports the TPM commands and the modelled dtpm time of
// Advance (+Settle) and Check.
func BenchmarkAnchor(b *testing.B) {
	ctx := context.Background()
	_, tpm := tpmtest.NewHost(b)
	dir := b.TempDir()
	v, err := vtpm.InitVault(ctx, tpm, vtpm.VaultConfig{Dir: dir}, vtpm.InitOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer v.Close()
	m := vtpm.NewMeter(tpm, vtpm.ProfileDTPM, vtpm.WithSleep(func(time.Duration) {}))
	a, err := vtpm.InitAnchor(ctx, m, v, vtpm.AnchorConfig{Dir: dir}, vtpm.Facts{}, vtpm.AnchorInitOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer a.Close()
	gen := uint64(0)
	for _, op := range []string{"advance+settle", "check"} {
		b.Run(op, func(b *testing.B) {
			m.Reset()
			n := 0
			for b.Loop() {
				n++
				switch op {
				case "advance+settle":
					gen++
					tk, err := a.Advance(ctx, []vtpm.Change{{VMID: vmA, Generation: gen}})
					if err != nil {
						b.Fatal(err)
					}
					if err := a.Settle(ctx, tk, vtpm.Facts{Holdings: []vtpm.Holding{{VMID: vmA, Generation: gen}}}); err != nil {
						b.Fatal(err)
					}
				case "check":
					var f vtpm.Facts
					if gen > 0 {
						f.Holdings = []vtpm.Holding{{VMID: vmA, Generation: gen}}
					}
					if _, err := a.Check(ctx, f); err != nil {
						b.Fatal(err)
					}
				}
			}
			s := m.Stats()
			b.ReportMetric(float64(s.Total)/float64(n), "tpm-cmds/op")
			b.ReportMetric(float64(s.Injected.Microseconds())/1000/float64(n), "dtpm-ms/op")
		})
	}
}
