package escrow

import (
	"crypto/ecdh"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"filippo.io/age"
	"filippo.io/age/plugin"
	"filippo.io/age/tag"
)

func tagRecipient(t *testing.T) string {
	t.Helper()
	k, err := ecdh.P256().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pub := k.PublicKey().Bytes()
	x, y := elliptic.Unmarshal(elliptic.P256(), pub) //nolint:staticcheck // compressing a point for the test
	r, err := tag.NewClassicRecipient(elliptic.MarshalCompressed(elliptic.P256(), x, y))
	if err != nil {
		t.Fatal(err)
	}
	return r.String()
}

func TestParseRecipient(t *testing.T) {
	x, _ := age.GenerateX25519Identity()
	pq, _ := age.GenerateHybridIdentity()
	sk, _ := ecdh.X25519().GenerateKey(rand.Reader)
	plug := plugin.EncodeRecipient("yubikey", sk.PublicKey().Bytes())
	for _, c := range []struct {
		in   string
		kind Kind
	}{
		{x.Recipient().String(), KindX25519},
		{"  " + x.Recipient().String() + "\n", KindX25519},
		{pq.Recipient().String(), KindHybrid},
		{tagRecipient(t), KindTag},
		{plug, "plugin:yubikey"},
	} {
		r, err := ParseRecipient(c.in, nil)
		if err != nil {
			t.Fatalf("%.30s: %v", c.in, err)
		}
		if r.Kind() != c.kind || r.String() != strings.TrimSpace(c.in) || len(r.Fingerprint()) != 16 {
			t.Errorf("%.30s: kind %s, string %.30s, fp %s", c.in, r.Kind(), r.String(), r.Fingerprint())
		}
	}
	if !KindHybrid.PostQuantum() || KindX25519.PostQuantum() || Kind("plugin:x").PostQuantum() || Kind("plugin:x").Plugin() != "x" || KindTag.Plugin() != "" {
		t.Error("kind predicates")
	}

	xr := x.Recipient().String()
	broken := xr[:len(xr)-1] + map[bool]string{true: "q", false: "p"}[xr[len(xr)-1] != 'q']
	for _, c := range []struct{ in, why string }{
		{"", "empty"},
		{x.String(), "this is an identity"},
		{pq.String(), "this is an identity"},
		{"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl", "SSH keys are not supported"},
		{"hello", "not an age recipient"},
		{broken, "invalid checksum"},
		{"age1pq1qqqq", "age1pq1qqqq"},
		{"age1" + strings.Repeat("q", 9000), "characters (limit"},
	} {
		_, err := ParseRecipient(c.in, nil)
		if !errors.Is(err, ErrBadRecipient) || !strings.Contains(err.Error(), c.why) {
			t.Errorf("%.30q: %v (want %q)", c.in, err, c.why)
		}
		if err != nil && strings.HasPrefix(c.in, "AGE-SECRET") && strings.Contains(err.Error(), c.in[16:40]) {
			t.Errorf("the error echoes a private key: %v", err)
		}
	}
}

func TestParseRecipientsFile(t *testing.T) {
	a, _ := age.GenerateX25519Identity()
	b, _ := age.GenerateX25519Identity()
	rs, err := ParseRecipientsFile("bob.txt", strings.NewReader("# bob's keys\n\n"+a.Recipient().String()+"\n  "+b.Recipient().String()+"  \n"), nil)
	if err != nil || len(rs) != 2 {
		t.Fatalf("%v %v", rs, err)
	}
	_, err = ParseRecipientsFile("bob.txt", strings.NewReader("# x\n"+a.Recipient().String()+"\nage1nonsense\n"), nil)
	if !errors.Is(err, ErrBadRecipient) || !strings.Contains(err.Error(), "bob.txt line 3") {
		t.Errorf("bad line: %v", err)
	}
	if _, err = ParseRecipientsFile("empty.txt", strings.NewReader("# nothing\n"), nil); !errors.Is(err, ErrBadRecipient) {
		t.Errorf("empty file: %v", err)
	}
	if _, err = ParseRecipientsFile("big.txt", strings.NewReader(strings.Repeat("#\n", maxKeyFile)), nil); !errors.Is(err, ErrBadRecipient) || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("big file: %v", err)
	}
	if _, err = ParseRecipientsFile("bin.txt", strings.NewReader("\xff\xfe\n"), nil); !errors.Is(err, ErrBadRecipient) || !strings.Contains(err.Error(), "UTF-8") {
		t.Errorf("binary file: %v", err)
	}
}

func TestParseIdentity(t *testing.T) {
	x, _ := age.GenerateX25519Identity()
	pq, _ := age.GenerateHybridIdentity()
	sk, _ := ecdh.X25519().GenerateKey(rand.Reader)
	for _, c := range []struct {
		in   string
		kind Kind
		fp   string
	}{
		{x.String(), KindX25519, fingerprint(x.Recipient().String())},
		{pq.String(), KindHybrid, fingerprint(pq.Recipient().String())},
		{plugin.EncodeIdentity("yubikey", sk.Bytes()), "plugin:yubikey", ""},
	} {
		id, err := ParseIdentity(c.in, "keys.txt line 1", nil)
		if err != nil {
			t.Fatal(err)
		}
		if id.Kind() != c.kind || id.Fingerprint() != c.fp {
			t.Errorf("%s: kind %s fp %s", c.kind, id.Kind(), id.Fingerprint())
		}
		// Never printed or marshalled.
		secret := c.in[len(c.in)-20:]
		for _, s := range []string{fmt.Sprint(id), fmt.Sprintf("%v %+v %#v %s %q", id, id, id, id, id), fmt.Sprintf("%+v", []*Identity{id})} {
			if strings.Contains(s, secret) || strings.Contains(strings.ToLower(s), strings.ToLower(secret)) {
				t.Errorf("%s printed its key: %s", c.kind, s)
			}
		}
		if _, err := json.Marshal(id); !errors.Is(err, ErrSecretMarshal) {
			t.Errorf("json.Marshal: %v", err)
		}
	}
	bad := x.String()
	flip := "Q" // a bech32 character other than the one it replaces (else the identity stays valid)
	if bad[30] == 'Q' {
		flip = "P"
	}
	bad = bad[:30] + flip + bad[31:]
	for _, c := range []struct{ in, why string }{
		{bad, "malformed x25519 identity"},
		{x.Recipient().String(), "this is a recipient"},
		{"password123", "not an age identity"},
		{"AGE-PLUGIN-!!-1QQQ", "malformed plugin identity"},
	} {
		_, err := ParseIdentity(c.in, "alice.key line 4", nil)
		if !errors.Is(err, ErrBadIdentity) || !strings.Contains(err.Error(), c.why) || !strings.Contains(err.Error(), "alice.key line 4") {
			t.Errorf("%.20s: %v", c.in, err)
		}
		if err != nil && len(c.in) > 20 && strings.Contains(err.Error(), c.in[16:]) {
			t.Errorf("the error echoes the identity: %v", err)
		}
	}
	ids, err := ParseIdentities("custodians.key", strings.NewReader("# created: today\n# public key: age1…\n"+x.String()+"\n"+pq.String()+"\n"), nil)
	if err != nil || len(ids) != 2 || !strings.Contains(ids[1].String(), "custodians.key line 4") {
		t.Fatalf("%v %v", ids, err)
	}
	if _, err := ParseIdentities("mixed.key", strings.NewReader(x.String()+"\n"+bad+"\n"), nil); !errors.Is(err, ErrBadIdentity) || !strings.Contains(err.Error(), "mixed.key line 2") || strings.Contains(err.Error(), bad[16:]) {
		t.Errorf("bad line: %v", err)
	}
	if _, err := ParseIdentities("none.key", strings.NewReader(""), nil); !errors.Is(err, ErrBadIdentity) {
		t.Errorf("empty: %v", err)
	}
}

func TestNewPolicy(t *testing.T) {
	rec := func() Recipient {
		x, _ := age.GenerateX25519Identity()
		r, _ := ParseRecipient(x.Recipient().String(), nil)
		return r
	}
	pqRec := func() Recipient {
		x, _ := age.GenerateHybridIdentity()
		r, _ := ParseRecipient(x.Recipient().String(), nil)
		return r
	}
	shared := rec()
	many := make([]Custodian, 256)
	for i := range many {
		many[i] = Custodian{Name: fmt.Sprintf("c%d", i), Recipients: []Recipient{rec()}}
	}
	for _, c := range []struct {
		name string
		k    int
		cs   []Custodian
		why  string
	}{
		{"k > n", 3, []Custodian{{"a", []Recipient{rec()}}, {"b", []Recipient{rec()}}}, "threshold 3 of 2"},
		{"k = 0", 0, []Custodian{{"a", []Recipient{rec()}}}, "threshold 0 of 1"},
		{"none", 1, nil, "threshold 1 of 0"},
		{"256 custodians", 2, many, "of 256"},
		{"duplicate name", 1, []Custodian{{"a", []Recipient{rec()}}, {"a", []Recipient{rec()}}}, "listed twice"},
		{"bad name", 1, []Custodian{{"al ice", []Recipient{rec()}}}, "name \"al ice\""},
		{"no recipient", 1, []Custodian{{"a", nil}}, "0 recipients"},
		{"zero recipient", 1, []Custodian{{"a", []Recipient{{}}}}, "not made by ParseRecipient"},
		{"shared key", 2, []Custodian{{"a", []Recipient{shared}}, {"b", []Recipient{rec(), shared}}}, "one key would open two shares"},
		{"mixed pq", 1, []Custodian{{"a", []Recipient{rec(), pqRec()}}}, "mixes post-quantum and classic"},
	} {
		if _, err := NewPolicy(c.k, c.cs); !errors.Is(err, ErrBadPolicy) || !strings.Contains(err.Error(), c.why) {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	p, err := NewPolicy(2, []Custodian{{"a", []Recipient{pqRec()}}, {"b", []Recipient{pqRec()}}, {"c", []Recipient{rec()}}})
	if err != nil || !p.PostQuantumSafe() || p.Threshold() != 2 || len(p.Custodians()) != 3 {
		t.Fatalf("1 classic of 3, k = 2: %v", err)
	}
	p, _ = NewPolicy(2, []Custodian{{"a", []Recipient{pqRec()}}, {"b", []Recipient{rec()}}, {"c", []Recipient{rec()}}})
	if p.PostQuantumSafe() {
		t.Error("2 classic of 3 with k = 2 is not post-quantum safe")
	}
}

func TestConfigPolicy(t *testing.T) {
	cs := newCustodians(t, 3, true)
	dir := t.TempDir()
	file := filepath.Join(dir, "carol.txt")
	if err := os.WriteFile(file, []byte("# carol\n"+cs[2].recipient+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := Config{Threshold: 2, Custodians: []CustodianConfig{
		{Name: "alice", Recipients: []string{cs[0].recipient}},
		{Name: "bob", Recipients: []string{cs[1].recipient}},
		{Name: "carol", RecipientsFile: file},
	}}
	p, err := cfg.Policy(nil)
	if err != nil || len(p.Custodians()) != 3 || p.Custodians()[2].Recipients[0].String() != cs[2].recipient || !p.PostQuantumSafe() {
		t.Fatalf("%v", err)
	}
	cfg.Custodians[1].Recipients = []string{cs[1].recipient, "age1bogus"}
	if _, err := cfg.Policy(nil); !errors.Is(err, ErrBadRecipient) || !strings.Contains(err.Error(), "custodian bob, recipient 2") {
		t.Errorf("bad inline: %v", err)
	}
	cfg.Custodians[1].Recipients = []string{cs[1].recipient}
	cfg.Custodians[2].RecipientsFile = filepath.Join(dir, "missing.txt")
	if _, err := cfg.Policy(nil); !errors.Is(err, ErrBadRecipient) || !strings.Contains(err.Error(), "custodian carol") {
		t.Errorf("missing file: %v", err)
	}
	cfg.Custodians[2].RecipientsFile = file
	cfg.Threshold = 4
	if _, err := cfg.Policy(nil); !errors.Is(err, ErrBadPolicy) {
		t.Errorf("k > n: %v", err)
	}
}
