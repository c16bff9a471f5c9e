package escrow

import (
	"errors"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

// FuzzPlanRestore: the restore decision on a bundle's header (untrusted:
// any file handed to vtpmctl restore) and the registry's view. A plan is
// made only for a valid destination, above every generation the bundle and
// the registry know, and never while another host may still run the VM
// unless the operator forced it; every refusal is typed.
func FuzzPlanRestore(f *testing.F) {
	golden, err := os.ReadFile(goldenBundle)
	if err != nil {
		f.Fatal(err)
	}
	h, err := Inspect(golden)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(h.Generation, "host-b", "host-a", string(OwnerLive), uint64(3), false, false)
	f.Add(h.Generation, "host-b", "host-a", string(OwnerUnreachable), uint64(3), true, false)
	f.Add(uint64(1), "host-a", "host-a", string(OwnerDrained), uint64(9), true, true)
	f.Add(uint64(1<<64-1), "host-b", "", string(OwnerNone), uint64(0), false, false)
	f.Add(uint64(2), "host-b", "host-a", "rebooting", uint64(2), true, true)
	f.Fuzz(func(t *testing.T, gen uint64, dest, owner, status string, viewGen uint64, force, allowOlder bool) {
		hdr := *h
		hdr.Generation = gen
		view := RegistryView{Owner: owner, Status: OwnerStatus(status), Generation: viewGen}
		p, err := PlanRestore(&hdr, dest, view, RestoreOptions{Force: force, AllowOlder: allowOlder})
		if err != nil {
			if !errors.Is(err, ErrBadRequest) && !errors.Is(err, ErrStaleBundle) && !errors.Is(err, ErrOwnerActive) {
				t.Fatalf("untyped refusal: %v", err)
			}
			return
		}
		st := view.Status
		active := st != OwnerNone && st != "" && st != OwnerFenced
		switch {
		case !hostIDRE.MatchString(dest) || p.Dest != dest:
			t.Fatalf("planned onto %q", dest)
		case p.Generation <= gen || p.Generation <= viewGen || p.FromGeneration != gen:
			t.Fatalf("plan at generation %d from %d, bundle %d, registry %d", p.Generation, p.FromGeneration, gen, viewGen)
		case gen < viewGen && !allowOlder:
			t.Fatal("a stale bundle was planned without AllowOlder")
		case active && owner == dest && !force:
			t.Fatal("planned onto the current owner without Force")
		case active && owner != dest && (st == OwnerLive || st == OwnerDraining):
			t.Fatalf("planned while the owner is %s", st)
		case active && owner != dest && !force:
			t.Fatalf("planned while the owner is %s without Force", st)
		case p.BundleID != h.ID || p.VM != h.VM:
			t.Fatal("the plan names another bundle or VM")
		}
	})
}

// FuzzParseBundleName: backup directories may hold any file; only names
// BundleName writes are taken for bundles, so that nothing else is ever
// pruned.
func FuzzParseBundleName(f *testing.F) {
	f.Add(BundleName(3, time.Date(2026, 12, 6, 10, 0, 0, 123, time.UTC)))
	f.Add("3-20261206T100000.000000123Z" + BundleExt + ".tmp")
	f.Add("03-20261206T100000.000000123Z" + BundleExt)
	f.Add("18446744073709551616-20261206T100000.000000123Z" + BundleExt)
	f.Add("notes.txt")
	f.Fuzz(func(t *testing.T, name string) {
		gen, at, ok := ParseBundleName(name)
		if !ok {
			return
		}
		if gen == 0 || BundleName(gen, at) != name || strings.ContainsRune(name, '/') {
			t.Fatalf("took %q for a bundle (generation %d at %v)", name, gen, at)
		}
	})
}

var ageRecipientRE = regexp.MustCompile(`age1[0-9a-z]+`)

// FuzzParseRecipientsFile: recipients files come from custodians. A
// refusal is ErrBadRecipient and never repeats a secret key pasted by
// mistake; an accepted file lists recipients that parse again, one per
// line, to the same fingerprints.
func FuzzParseRecipientsFile(f *testing.F) {
	ids, err := os.ReadFile(goldenIdentities)
	if err != nil {
		f.Fatal(err)
	}
	recips := ageRecipientRE.FindAllString(string(ids), -1)
	if len(recips) == 0 {
		f.Fatal("no recipients in the golden identities' comments")
	}
	f.Add("# custodians\n" + strings.Join(recips, "\n") + "\n")
	f.Add(recips[0] + "\r\n\n# x\n")
	f.Add(string(ids))
	f.Add("age1bogus\n")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		rs, err := ParseRecipientsFile("fuzz.txt", strings.NewReader(s), nil)
		if err != nil {
			if !errors.Is(err, ErrBadRecipient) {
				t.Fatalf("untyped refusal: %v", err)
			}
			for _, line := range strings.Split(s, "\n") {
				if ts := strings.TrimSpace(line); strings.HasPrefix(strings.ToUpper(ts), "AGE-") && len(ts) >= 24 && strings.Contains(err.Error(), ts[12:]) {
					t.Fatalf("the error echoes a secret key: %v", err)
				}
			}
			return
		}
		if len(rs) == 0 {
			t.Fatal("accepted a file without recipients")
		}
		var lines []string
		for _, r := range rs {
			lines = append(lines, r.String())
		}
		again, err := ParseRecipientsFile("again.txt", strings.NewReader(strings.Join(lines, "\n")), nil)
		if err != nil || len(again) != len(rs) {
			t.Fatalf("the recipients do not parse again: %v", err)
		}
		for i := range rs {
			if again[i].Fingerprint() != rs[i].Fingerprint() || again[i].Kind() != rs[i].Kind() {
				t.Fatalf("recipient %d changed: %s / %s", i, rs[i], again[i])
			}
		}
	})
}
