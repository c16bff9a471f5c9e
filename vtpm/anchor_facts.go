package vtpm

import (
	"fmt"
	"sort"
	"strings"
)

// Holding is one ownership fact: this host holds the key of VMID at
// Generation (an active envelope in DATA/keys; pending keys are not
// ownership).
type Holding struct {
	VMID       string `json:"vm"`
	Generation uint64 `json:"gen"`
}

// Facts are the key store's ownership facts as the caller reads them from
// the key store (KeyStore.Facts), to compare with the anchor.
type Facts struct {
	// Holdings lists every VM the key store holds an active key for.
	Holdings []Holding
	// Damaged lists VMs whose envelope exists but cannot be read. They are
	// not compared (the caller lists them as damaged), so one damaged
	// envelope does not make the whole host look rolled back.
	Damaged []string
}

// Change is one ownership change of an anchor step: after the step, this
// host holds VMID at Generation; Generation 0 means it holds no key for the
// VM any more (it was released).
type Change struct {
	VMID       string `json:"vm"`
	Generation uint64 `json:"gen"`
}

// pendingChange is a change the anchor recorded (Advance) that the caller
// has not settled yet: the key store may hold the VM at From or at To.
type pendingChange struct {
	VMID string `json:"vm"`
	From uint64 `json:"from"`
	To   uint64 `json:"to"`
}

// anchorPending is one Advance that is not settled yet.
type anchorPending struct {
	Ticket  uint64          `json:"ticket"` // the counter value this Advance took the TPM to
	Changes []pendingChange `json:"changes"`
}

// AnchorTicket identifies one Advance until it is settled: the counter value
// that Advance took the TPM to.
type AnchorTicket uint64

func holdingMap(hs []Holding) map[string]uint64 {
	m := make(map[string]uint64, len(hs))
	for _, h := range hs {
		m[h.VMID] = h.Generation
	}
	return m
}

func sortedHoldings(m map[string]uint64) []Holding {
	out := make([]Holding, 0, len(m))
	for vm, g := range m {
		if g != 0 {
			out = append(out, Holding{VMID: vm, Generation: g})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VMID < out[j].VMID })
	return out
}

func checkFacts(f Facts) error {
	seen := map[string]bool{}
	for _, h := range f.Holdings {
		if err := CheckVMID(h.VMID); err != nil {
			return err
		}
		if h.Generation == 0 {
			return fmt.Errorf("%w: VM %s held at generation 0", ErrCorrupt, h.VMID)
		}
		if seen[h.VMID] {
			return fmt.Errorf("%w: VM %s listed twice", ErrCorrupt, h.VMID)
		}
		seen[h.VMID] = true
	}
	return nil
}

// HoldingDiff is one VM on which the key store and the anchor disagree.
type HoldingDiff struct {
	VMID string
	// Anchor is the generation the anchor recorded (0: not held); when the
	// VM is part of an unsettled change, AnchorAlt is the other accepted
	// generation.
	Anchor, AnchorAlt uint64
	Pending           bool
	// KeyStore is the generation the key store holds (0: no key).
	KeyStore uint64
}

func (d HoldingDiff) String() string {
	want := fmt.Sprintf("generation %d", d.Anchor)
	if d.Anchor == 0 {
		want = "no key"
	}
	if d.Pending {
		want = fmt.Sprintf("generation %d or %d (unsettled change)", d.Anchor, d.AnchorAlt)
	}
	switch {
	case d.KeyStore == 0:
		return fmt.Sprintf("VM %s: the key store holds no key, the anchor recorded %s (envelope deleted, or the directory restored from before the VM arrived?)", d.VMID, want)
	case d.Anchor == 0 && !d.Pending:
		return fmt.Sprintf("VM %s: the key store holds generation %d, the anchor recorded no key (envelope restored from a backup after the VM left?)", d.VMID, d.KeyStore)
	case d.KeyStore < d.Anchor:
		return fmt.Sprintf("VM %s: the key store holds generation %d, the anchor recorded %s (an older envelope restored?)", d.VMID, d.KeyStore, want)
	}
	return fmt.Sprintf("VM %s: the key store holds generation %d, the anchor recorded %s", d.VMID, d.KeyStore, want)
}

// AnchorMismatchError says which VMs the key store holds differently from
// what the anchor recorded. It matches ErrAnchorMismatch.
type AnchorMismatchError struct {
	File  string // the anchor file
	Keys  string // the key store directory
	Diffs []HoldingDiff
}

func (e *AnchorMismatchError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%v: %s does not hold what %s recorded: ", ErrAnchorMismatch, e.Keys, e.File)
	for i, d := range e.Diffs {
		if i == 8 {
			fmt.Fprintf(&b, "; and %d more", len(e.Diffs)-i)
			break
		}
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(d.String())
	}
	b.WriteString(". vtpmd refuses to start: a restored envelope can bring back a VM another host owns now." +
		" Confirm each VM's owner with the registry or the peers, restore or remove the envelopes, or accept the" +
		" key store as it is with 'vtpmd anchor accept' (audited)")
	return b.String()
}

// Is matches ErrAnchorMismatch.
func (e *AnchorMismatchError) Is(t error) bool { return t == ErrAnchorMismatch }

// compareFacts compares the key store's facts with the anchor's holdings
// and unsettled changes. A VM of an unsettled change may be at either end of
// it; every other VM must be exactly as recorded. Damaged VMs are skipped.
func compareFacts(f anchorFile, facts Facts) []HoldingDiff {
	rec := holdingMap(f.Holdings)
	pend := map[string]pendingChange{}
	for _, p := range f.Pending {
		for _, c := range p.Changes {
			pend[c.VMID] = c
		}
	}
	have := holdingMap(facts.Holdings)
	skip := map[string]bool{}
	for _, vm := range facts.Damaged {
		skip[vm] = true
	}
	vms := map[string]bool{}
	for vm := range rec {
		vms[vm] = true
	}
	for vm := range have {
		vms[vm] = true
	}
	for vm := range pend {
		vms[vm] = true
	}
	var diffs []HoldingDiff
	for vm := range vms {
		if skip[vm] {
			continue
		}
		h := have[vm]
		if c, ok := pend[vm]; ok {
			if h != c.From && h != c.To {
				diffs = append(diffs, HoldingDiff{VMID: vm, Anchor: c.To, AnchorAlt: c.From, Pending: true, KeyStore: h})
			}
			continue
		}
		if h != rec[vm] {
			diffs = append(diffs, HoldingDiff{VMID: vm, Anchor: rec[vm], KeyStore: h})
		}
	}
	sort.Slice(diffs, func(i, j int) bool { return diffs[i].VMID < diffs[j].VMID })
	return diffs
}
