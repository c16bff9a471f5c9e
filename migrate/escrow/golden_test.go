package escrow

import (
	"bytes"
	"context"
	"flag"
	"os"
	"strings"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/vtpmm/vtpmm/vtpm"
)

var update = flag.Bool("update", false, "rewrite testdata/v1-* (a new golden bundle: only when the format changes on purpose)")

// goldenKey is the test VM key inside testdata/v1-2of3.vtpmbundle. It is a
// test vector, not a secret.
var goldenKey = []byte("vtpmm escrow golden test vm key!")

const (
	goldenBundle     = "testdata/v1-2of3.vtpmbundle"
	goldenIdentities = "testdata/v1-custodians.key" // alice, bob (X25519), carol (ML-KEM-768 + X25519)
	goldenState      = "golden vTPM state blob (opaque to escrow)"
)

func writeGolden(t *testing.T) {
	var lines []string
	var cfg Config
	cfg.Threshold = 2
	for _, name := range []string{"alice", "bob", "carol"} {
		var id, rec string
		if name == "carol" {
			i, _ := age.GenerateHybridIdentity()
			id, rec = i.String(), i.Recipient().String()
		} else {
			i, _ := age.GenerateX25519Identity()
			id, rec = i.String(), i.Recipient().String()
		}
		lines = append(lines, "# "+name+": "+rec, id)
		cfg.Custodians = append(cfg.Custodians, CustodianConfig{Name: name, Recipients: []string{rec}})
	}
	p, err := cfg.Policy(nil)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := vtpm.NewVMKey(bytes.NewReader(goldenKey))
	s, _ := NewSealer(p, SealerOptions{Now: func() time.Time { return time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC) }})
	b, err := s.Seal(context.Background(), Contents{VM: VM{UUID: testVM, Name: "golden"}, Generation: 3, SourceHost: "host-a",
		VaultKeyID: "af1eff80674fea70", State: []byte(goldenState)}, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(goldenBundle, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(goldenIdentities, []byte("# test identities of "+goldenBundle+": not secrets\n"+strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

func goldenIDs(t testing.TB) []*Identity {
	t.Helper()
	f, err := os.Open(goldenIdentities)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ids, err := ParseIdentities(goldenIdentities, f, nil)
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

// TestGoldenBundleV1: a version 1 bundle written by an earlier build
// still opens, with any two of its three custodians.
func TestGoldenBundleV1(t *testing.T) {
	if *update {
		writeGolden(t)
	}
	b, err := os.ReadFile(goldenBundle)
	if err != nil {
		t.Fatal(err)
	}
	ids := goldenIDs(t)
	want, _ := vtpm.NewVMKey(bytes.NewReader(goldenKey))
	for _, pair := range [][2]int{{0, 1}, {0, 2}, {1, 2}} {
		o, err := Open(context.Background(), b, testVM, []*Identity{ids[pair[0]], ids[pair[1]]}, OpenOptions{})
		if err != nil {
			t.Fatalf("%v: %v", pair, err)
		}
		h := o.Header
		if !o.Key().Equal(want) || string(o.State) != goldenState || h.Generation != 3 || h.VM.Name != "golden" ||
			h.Custodians[2].Recipients[0].Kind != KindHybrid || h.Scheme != schemeShamir {
			t.Fatalf("%v: header %+v", pair, h)
		}
		o.Destroy()
	}
	if _, err := Open(context.Background(), b, testVM, ids[:1], OpenOptions{}); err == nil {
		t.Fatal("one custodian opened a 2-of-3 bundle")
	}
}
