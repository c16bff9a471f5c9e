package escrow

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"testing"
)

// FuzzDecodeBundle: a bundle is untrusted input (a backup directory, a
// file handed to vtpmctl restore). The structural check never panics and
// refuses with a typed error; whatever it accepts is canonical; and Open
// with the golden identities accepts nothing but the golden bytes.
func FuzzDecodeBundle(f *testing.F) {
	golden, err := os.ReadFile(goldenBundle)
	if err != nil {
		f.Fatal(err)
	}
	ids := goldenIDs(f)
	f.Add(golden)
	f.Add(golden[:len(golden)/2])
	f.Add([]byte(magic + "\x00\x01\x00\x00\x00\x02{}"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := Inspect(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrUnsupportedVersion) {
				t.Fatalf("untyped refusal: %v", err)
			}
			return
		}
		if h.N != len(h.Custodians) || h.Threshold < 1 || h.Threshold > h.N {
			t.Fatalf("accepted an invalid header: %+v", h)
		}
		canon, err := encodeHeader(h)
		if err != nil || !bytes.Contains(b, canon) {
			t.Fatalf("accepted a non-canonical header: %v", err)
		}
		o, err := Open(context.Background(), b, h.VM.UUID, ids, OpenOptions{})
		if err == nil {
			o.Destroy()
			if !bytes.Equal(b, golden) {
				t.Fatalf("a changed bundle opened")
			}
			return
		}
		for _, want := range []error{ErrTampered, ErrNotEnoughShares, ErrBadRequest} {
			if errors.Is(err, want) {
				return
			}
		}
		t.Fatalf("untyped refusal after the structural check: %v", err)
	})
}

// FuzzParseRecipient: recipient strings come from the configuration.
func FuzzParseRecipient(f *testing.F) {
	for _, s := range []string{"age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p",
		"age1pq1qqqq", "age1tag1qqqq", "age1yubikey1qqqq", "AGE-SECRET-KEY-1QQQQ", "ssh-ed25519 AAAA", "", "age1\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRecipient(s, nil)
		if err != nil {
			if !errors.Is(err, ErrBadRecipient) {
				t.Fatalf("untyped refusal: %v", err)
			}
			if ts := strings.TrimSpace(s); strings.HasPrefix(strings.ToUpper(ts), "AGE-") && len(ts) >= 24 && strings.Contains(err.Error(), ts[12:]) {
				t.Fatalf("the error echoes an identity: %v", err)
			}
			return
		}
		if r.r == nil || len(r.Fingerprint()) != 16 || !strings.HasPrefix(strings.ToLower(r.String()), "age1") {
			t.Fatalf("accepted %q as %+v", s, r)
		}
	})
}

// FuzzParseIdentities: identity files come from custodians; errors must
// never echo a line of them.
func FuzzParseIdentities(f *testing.F) {
	golden, err := os.ReadFile(goldenIdentities)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(string(golden))
	f.Add("AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ\n")
	f.Add("AGE-PLUGIN-YUBIKEY-1QQQQ\n# c\n\n")
	f.Fuzz(func(t *testing.T, s string) {
		ids, err := ParseIdentities("fuzz.key", strings.NewReader(s), nil)
		if err != nil {
			if !errors.Is(err, ErrBadIdentity) {
				t.Fatalf("untyped refusal: %v", err)
			}
			for _, line := range strings.Split(s, "\n") {
				if line = strings.TrimSpace(line); len(line) >= 24 && strings.Contains(err.Error(), line) {
					t.Fatalf("the error echoes a line: %v", err)
				}
			}
			return
		}
		for _, id := range ids {
			if id.id == nil {
				t.Fatal("nil identity accepted")
			}
		}
	})
}

// FuzzShamir: any secret, any valid k of n: the first k shares and the
// last k shares both rebuild it.
func FuzzShamir(f *testing.F) {
	f.Add([]byte("0123456789abcdef0123456789abcdef"), uint8(5), uint8(3))
	f.Add([]byte{0}, uint8(255), uint8(255))
	f.Fuzz(func(t *testing.T, secret []byte, n, k uint8) {
		if len(secret) == 0 || len(secret) > 64 || k < 2 || k > n {
			return
		}
		shares, err := splitSecret(bytes.NewReader(bytes.Repeat([]byte{0x5a, 0xc3, 0x01}, int(k)*len(secret))), secret, int(n), int(k))
		if err != nil {
			t.Fatal(err)
		}
		for _, sub := range [][]share{shares[:k], shares[int(n)-int(k):]} {
			got, err := combineShares(sub)
			if err != nil || !bytes.Equal(got, secret) {
				t.Fatalf("%d of %d: %v", k, n, err)
			}
		}
	})
}
