package escrow

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestSealOpenEveryKSubset(t *testing.T) {
	for _, c := range []struct {
		name string
		n, k int
		pq   bool
	}{
		{"x25519 2 of 3", 3, 2, false},
		{"x25519 3 of 5", 5, 3, false},
		{"pq 2 of 3", 3, 2, true},
		{"x25519 1 of 2", 2, 1, false},
		{"pq 1 of 1", 1, 1, true},
		{"x25519 4 of 4", 4, 4, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			cs := newCustodians(t, c.n, c.pq)
			key, _ := knownKey(t)
			state := testState(3000)
			b := seal(t, policyFor(t, c.k, cs), testContents(state), key)
			subsets(c.n, c.k, func(idx []int) {
				var holders []custodianKeys
				for _, i := range idx {
					holders = append(holders, cs[i])
				}
				o, err := Open(context.Background(), b, testVM, identitiesOf(t, holders...), OpenOptions{})
				if err != nil {
					t.Fatalf("custodians %v: %v", idx, err)
				}
				defer o.Destroy()
				if !o.Key().Equal(key) || !bytes.Equal(o.State, state) {
					t.Fatalf("custodians %v: wrong key or state", idx)
				}
				h := o.Header
				if h.VM.Name != "vm42" || h.Generation != 7 || h.SourceHost != "host-a" || h.VaultKeyID != "af1eff80674fea70" ||
					!h.Created.Equal(testNow) || h.Threshold != c.k || h.N != c.n || len(o.Used) != c.k {
					t.Fatalf("header %+v, used %v", h, o.Used)
				}
			})
			if c.k > 1 {
				// k-1 custodians: refused, naming how many are needed and who holds the rest.
				_, err := Open(context.Background(), b, testVM, identitiesOf(t, cs[:c.k-1]...), OpenOptions{})
				var se *SharesError
				if !errors.Is(err, ErrNotEnoughShares) || !errors.As(err, &se) || errors.Is(err, ErrWrongIdentity) {
					t.Fatalf("k-1 custodians: %v", err)
				}
				if se.Need != c.k || len(se.Opened) != c.k-1 || len(se.Missing) != c.n-c.k+1 || !strings.Contains(err.Error(), cs[c.n-1].name) {
					t.Fatalf("k-1 custodians: %+v", se)
				}
			}
		})
	}
}

func TestOpenRefusals(t *testing.T) {
	cs := newCustodians(t, 3, false)
	key, _ := knownKey(t)
	p := policyFor(t, 2, cs)
	b := seal(t, p, testContents(testState(100)), key)
	strangers := newCustodians(t, 2, false)
	ctx := context.Background()

	_, err := Open(ctx, b, testVM, identitiesOf(t, strangers...), OpenOptions{})
	if !errors.Is(err, ErrWrongIdentity) || !errors.Is(err, ErrNotEnoughShares) || !strings.Contains(err.Error(), "identities that open no share: x25519 identity from custodian-1.key") {
		t.Errorf("wrong identities: %v", err)
	}
	_, err = Open(ctx, b, testVM, nil, OpenOptions{})
	if !errors.Is(err, ErrWrongIdentity) || !strings.Contains(err.Error(), "no identity was given") {
		t.Errorf("no identities: %v", err)
	}
	// One right, one wrong: not enough, naming the unmatched identity.
	_, err = Open(ctx, b, testVM, append(identitiesOf(t, cs[0]), identitiesOf(t, strangers[0])...), OpenOptions{})
	if !errors.Is(err, ErrNotEnoughShares) || errors.Is(err, ErrWrongIdentity) || !strings.Contains(err.Error(), "2 of 3 shares needed, 1 opened (custodian-1): 1 more needed from the custodians custodian-2, custodian-3") {
		t.Errorf("one of two: %v", err)
	}
	other := "11111111-2222-4333-8444-555555555555"
	if _, err = Open(ctx, b, other, identitiesOf(t, cs...), OpenOptions{}); !errors.Is(err, ErrWrongVM) || !strings.Contains(err.Error(), testVM) {
		t.Errorf("other VM: %v", err)
	}
	if _, err = Open(ctx, b, "vm42", identitiesOf(t, cs...), OpenOptions{}); !errors.Is(err, ErrBadRequest) {
		t.Errorf("expected VM not a UUID: %v", err)
	}
	v2 := bytes.Clone(b)
	binary.BigEndian.PutUint16(v2[len(magic):], 2)
	if _, err = Open(ctx, v2, testVM, identitiesOf(t, cs...), OpenOptions{}); !errors.Is(err, ErrUnsupportedVersion) {
		t.Errorf("version 2: %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err = Open(cctx, b, testVM, identitiesOf(t, cs...), OpenOptions{}); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v", err)
	}
}

// TestEveryByteFlipIsDetected flips one bit of every byte of a bundle:
// each is refused, by the structural check or after unlock.
func TestEveryByteFlipIsDetected(t *testing.T) {
	cs := newCustodians(t, 3, false)
	key, _ := knownKey(t)
	b := seal(t, policyFor(t, 2, cs), testContents(testState(64)), key)
	ids := identitiesOf(t, cs...)
	counts := map[string]int{}
	for i := range b {
		for _, bit := range []byte{0x01, 0x80} {
			m := bytes.Clone(b)
			m[i] ^= bit
			o, err := Open(context.Background(), m, testVM, ids, OpenOptions{})
			switch {
			case err == nil:
				o.Destroy()
				t.Fatalf("byte %d ^ %#x: accepted", i, bit)
			case errors.Is(err, ErrTampered):
				counts["tampered"]++
			case errors.Is(err, ErrMalformed):
				counts["malformed"]++
			case errors.Is(err, ErrUnsupportedVersion):
				counts["version"]++
			case errors.Is(err, ErrWrongVM):
				counts["wrong vm"]++
			default:
				t.Fatalf("byte %d ^ %#x: unclassified error %v", i, bit, err)
			}
		}
	}
	t.Logf("%d bytes, refusals: %v", len(b), counts)
	if counts["tampered"] == 0 || counts["malformed"] == 0 {
		t.Fatalf("expected both structural and authentication refusals: %v", counts)
	}
}

// TestTamperNamesThePart: forgeries that pass the structural check are
// refused, naming the part.
func TestTamperNamesThePart(t *testing.T) {
	cs := newCustodians(t, 3, false)
	key, _ := knownKey(t)
	p := policyFor(t, 2, cs)
	b := seal(t, p, testContents(testState(500)), key)
	b2 := seal(t, p, testContents(testState(500)), key) // another bundle, same custodians
	d2 := mustDecode(t, b2)
	ctx := context.Background()
	all := identitiesOf(t, cs...)
	first2 := identitiesOf(t, cs[0], cs[1])
	// foreign puts bundle 2's share of custodian i into the frame, with
	// (withDigest) or without updating the header.
	foreign := func(i int, withDigest bool) func(f *frame) {
		return func(f *frame) {
			f.shares[i] = bytes.Clone(d2.shares[i])
			if withDigest {
				f.h.Custodians[i].ShareSize = len(d2.shares[i])
				f.h.Custodians[i].ShareSHA256 = d2.hdr.Custodians[i].ShareSHA256
			}
		}
	}
	for _, c := range []struct {
		name   string
		mutate func(f *frame)
		ids    []*Identity
		want   string
		also   error
	}{
		{"generation raised", func(f *frame) { f.h.Generation++ }, all, "header/", nil},
		{"source host", func(f *frame) { f.h.SourceHost = "host-evil" }, all, "header/", nil},
		{"creation time", func(f *frame) { f.h.Created = f.h.Created.Add(1) }, all, "header/", nil},
		{"VM name", func(f *frame) { f.h.VM.Name = "vm43" }, all, "header/", nil},
		{"custodian renamed", func(f *frame) { f.h.Custodians[2].Name = "mallory" }, all, "header/", nil},
		{"recipient label", func(f *frame) { f.h.Custodians[2].Recipients[0].Fingerprint = "0000000000000000" }, all, "header/", nil},
		{"labels of the shares needed", func(f *frame) {
			f.h.Custodians[0].Recipients[0].Fingerprint = "0000000000000000"
			f.h.Custodians[1].Recipients[0].Fingerprint = "1111111111111111"
		}, first2, "header/", nil},
		{"state and its digest replaced", func(f *frame) {
			f.state = []byte("other state")
			f.h.State = StateInfo{Size: int64(len(f.state)), SHA256: digestHex(f.state)}
		}, all, "header/", nil},
		{"state changed", func(f *frame) { f.state[10] ^= 1 }, all, "state/", nil},
		{"sealed key changed", func(f *frame) { f.ct = bytes.Clone(f.ct); f.ct[0] ^= 1 }, all, "header/", nil},
		{"nonce changed", func(f *frame) { f.nonce = bytes.Clone(f.nonce); f.nonce[0] ^= 1 }, all, "header/", nil},
		{"share swapped, k others remain", foreign(1, false), all, "share/custodian-2", nil},
		{"unused share swapped", foreign(2, false), first2, "share/custodian-3", nil},
		{"share swapped, fewer than k remain", foreign(1, false), first2, "share/custodian-2", ErrNotEnoughShares},
		{"share and its digest from another bundle", foreign(1, true), first2, "share/custodian-2", ErrNotEnoughShares},
		{"two shares and digests from another bundle", func(f *frame) { foreign(0, true)(f); foreign(1, true)(f) }, first2, "share/custodian-1", ErrNotEnoughShares},
	} {
		t.Run(c.name, func(t *testing.T) {
			m := reframe(t, b, c.mutate)
			o, err := Open(ctx, m, testVM, c.ids, OpenOptions{})
			if err == nil {
				o.Destroy()
				t.Fatal("forgery accepted")
			}
			var te *TamperError
			if !errors.Is(err, ErrTampered) || !errors.As(err, &te) || te.Part+"/"+te.Custodian != c.want {
				t.Fatalf("got %v, want a tamper error %s", err, c.want)
			}
			if c.also != nil && !errors.Is(err, c.also) {
				t.Fatalf("%v is not %v", err, c.also)
			}
		})
	}

	// A damaged share does not block a disaster recovery when k intact
	// shares remain and the operator accepts it: key and state are
	// authenticated, the damage is reported.
	for _, i := range []int{0, 1, 2} {
		m := reframe(t, b, foreign(i, false))
		o, err := Open(ctx, m, testVM, all, OpenOptions{AcceptDamagedShares: true})
		if err != nil {
			t.Fatalf("share %d damaged, accepted: %v", i, err)
		}
		if !o.Key().Equal(key) || len(o.Damaged) != 1 || o.Damaged[0] != cs[i].name || slices.Contains(o.Used, cs[i].name) {
			t.Fatalf("share %d damaged: used %v, damaged %v", i, o.Used, o.Damaged)
		}
		o.Destroy()
	}
}

func mustDecode(t *testing.T, b []byte) *decoded {
	t.Helper()
	d, err := decodeBundle(b)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestInspect(t *testing.T) {
	cs := newCustodians(t, 2, true)
	key, _ := knownKey(t)
	b := seal(t, policyFor(t, 2, cs), testContents(testState(10)), key)
	h, err := Inspect(b)
	if err != nil {
		t.Fatal(err)
	}
	if h.VM.UUID != testVM || h.Custodians[0].Recipients[0].Kind != KindHybrid || h.Scheme != schemeShamir {
		t.Fatalf("%+v", h)
	}
	for name, m := range map[string][]byte{
		"empty":       nil,
		"not bundle":  []byte("age-encryption.org/v1\n"),
		"truncated":   b[:len(b)-1],
		"trailing":    append(bytes.Clone(b), 0),
		"huge header": append([]byte(magic+"\x00\x01\xff\xff\xff\xff"), make([]byte, 100)...),
	} {
		if _, err := Inspect(m); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestSealRefusals(t *testing.T) {
	cs := newCustodians(t, 2, false)
	p := policyFor(t, 2, cs)
	key, _ := knownKey(t)
	s, _ := NewSealer(p, SealerOptions{})
	ctx := context.Background()
	for name, mutate := range map[string]func(*Contents){
		"bad uuid":     func(c *Contents) { c.VM.UUID = "VM-42" },
		"no name":      func(c *Contents) { c.VM.Name = "" },
		"control char": func(c *Contents) { c.VM.Name = "a\nb" },
		"generation 0": func(c *Contents) { c.Generation = 0 },
		"bad host":     func(c *Contents) { c.SourceHost = "host a" },
		"bad kid":      func(c *Contents) { c.VaultKeyID = "xyz" },
	} {
		c := testContents(nil)
		mutate(&c)
		if _, err := s.Seal(ctx, c, key); !errors.Is(err, ErrBadRequest) {
			t.Errorf("%s: %v", name, err)
		}
	}
	var empty = key
	empty.Destroy()
	if _, err := s.Seal(ctx, testContents(nil), vtpmZeroKey()); !errors.Is(err, ErrBadRequest) {
		t.Errorf("empty key: %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	k2, _ := knownKey(t)
	if _, err := s.Seal(cctx, testContents(nil), k2); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v", err)
	}
	if _, err := NewSealer(nil, SealerOptions{}); !errors.Is(err, ErrBadPolicy) {
		t.Errorf("nil policy: %v", err)
	}
}
