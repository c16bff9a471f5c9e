package migrate_test

import (
	"context"

	"github.com/vtpmm/vtpmm/vtpm"
)

// The harness's rollback anchor: the node's adapter, and a host's anchor
// opened, checked and accepted as vtpmd and its operator do.

// harnessAnchor is the node's view of the host's anchor, as the daemon's
// adapter: settle with the key store's facts and the audit log's head.
type harnessAnchor struct{ h *host }

func (a harnessAnchor) Advance(ctx context.Context, changes []vtpm.Change) (vtpm.AnchorTicket, error) {
	return a.h.anchor.Advance(ctx, changes)
}

func (a harnessAnchor) Settle(ctx context.Context, t vtpm.AnchorTicket) error {
	facts, err := a.h.keys.Facts(ctx)
	if err != nil {
		return err
	}
	seq, head := a.h.audit.log.Head()
	a.h.anchor.SetAuditMark(vtpm.AuditMark{Seq: seq, Head: head})
	return a.h.anchor.Settle(ctx, t, facts)
}

// openAnchor opens and checks the host's rollback anchor as vtpmd does at
// start, and settles what a crash left unsettled.
func (h *host) openAnchor() {
	t, ctx := h.f.t, context.Background()
	t.Helper()
	if h.anchor != nil {
		h.anchor.Close()
	}
	a, err := vtpm.OpenAnchor(ctx, h.meter, h.vault, vtpm.AnchorConfig{Dir: h.dir})
	if err != nil {
		t.Fatalf("%s: open anchor: %v", h.name, err)
	}
	checks, err := h.keys.CheckKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	facts := vtpm.FactsFromChecks(checks)
	if _, err := a.Check(ctx, facts); err != nil {
		t.Fatalf("%s: anchor check at restart: %v", h.name, err)
	}
	if err := a.SettleAll(ctx, facts); err != nil {
		t.Fatalf("%s: settle the anchor at restart: %v", h.name, err)
	}
	h.anchor = a
}

// acceptAnchor plays an operator who runs 'vtpmd anchor accept' on a
// host whose data directory the anchor refuses: it checks the refusal,
// then accepts the key store as it is. The host is restarted afterwards.
func (h *host) acceptAnchor() {
	t, ctx := h.f.t, context.Background()
	t.Helper()
	if h.anchor != nil {
		h.anchor.Close()
		h.anchor = nil
	}
	keys, err := vtpm.NewKeyStore(h.dir, h.name, h.vault, nil)
	if err != nil {
		t.Fatal(err)
	}
	checks, err := keys.CheckKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	facts := vtpm.FactsFromChecks(checks)
	a, err := vtpm.OpenAnchor(ctx, h.meter, h.vault, vtpm.AnchorConfig{Dir: h.dir})
	if err != nil {
		t.Fatal(err)
	}
	_, err = a.Check(ctx, facts)
	a.Close()
	if err == nil {
		t.Fatalf("%s: the anchor accepted a data directory that changed behind its back", h.name)
	}
	t.Logf("%s: anchor refused: %v", h.name, err)
	acc, _, err := vtpm.AcceptAnchorState(ctx, h.meter, h.vault, vtpm.AnchorConfig{Dir: h.dir}, facts, vtpm.AnchorAcceptance{
		Operator: "test", Reason: "accepted without confirming the owners",
		Audit: func(context.Context, vtpm.AnchorAcceptRecord) error { return nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	acc.Close()
}

// checkAnchor checks, as a fresh start would, that the data directory
// agrees with the host TPM's anchor (no false rollback).
func (h *host) checkAnchor() {
	t, ctx := h.f.t, context.Background()
	t.Helper()
	a, err := vtpm.OpenAnchor(ctx, h.meter, h.vault, vtpm.AnchorConfig{Dir: h.dir})
	if err != nil {
		t.Fatalf("%s: open anchor: %v", h.name, err)
	}
	defer a.Close()
	checks, _ := h.keys.CheckKeys(ctx)
	if _, err := a.Check(ctx, vtpm.FactsFromChecks(checks)); err != nil {
		t.Fatalf("%s: the data directory disagrees with the anchor: %v", h.name, err)
	}
}
