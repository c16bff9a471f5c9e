package escrow

import (
	"bytes"
	"crypto/rand"
	"errors"
	"testing"
)

// refMul is an independent reference: log/exp tables of the generator 3.
func refTables() (exp [510]byte, log [256]byte) {
	x := byte(1)
	for i := range 255 {
		exp[i], exp[i+255] = x, x
		log[x] = byte(i)
		// x *= 3: x·2 ^ x
		hi := x & 0x80
		x2 := x << 1
		if hi != 0 {
			x2 ^= 0x1b
		}
		x ^= x2
	}
	return exp, log
}

func TestGFMulMatchesTables(t *testing.T) {
	exp, log := refTables()
	for a := range 256 {
		for b := range 256 {
			want := byte(0)
			if a != 0 && b != 0 {
				want = exp[int(log[a])+int(log[b])]
			}
			if got := gfMul(byte(a), byte(b)); got != want {
				t.Fatalf("gfMul(%#x, %#x) = %#x, want %#x", a, b, got, want)
			}
		}
	}
}

func TestGFKnownAnswers(t *testing.T) {
	// FIPS-197 section 4.2 and the AES S-box's inverse of 0x53.
	for _, c := range []struct{ a, b, want byte }{
		{0x57, 0x83, 0xc1}, {0x57, 0x13, 0xfe}, {0x57, 0x02, 0xae}, {0x57, 0x04, 0x47},
		{0x57, 0x08, 0x8e}, {0x57, 0x10, 0x07}, {0x01, 0xff, 0xff}, {0x00, 0xff, 0x00},
	} {
		if got := gfMul(c.a, c.b); got != c.want {
			t.Errorf("%#x·%#x = %#x, want %#x", c.a, c.b, got, c.want)
		}
	}
	if got := gfInv(0x53); got != 0xca {
		t.Errorf("inv(0x53) = %#x, want 0xca", got)
	}
	if gfInv(0) != 0 {
		t.Error("inv(0) != 0")
	}
	for a := 1; a < 256; a++ {
		if gfMul(byte(a), gfInv(byte(a))) != 1 {
			t.Fatalf("a·inv(a) != 1 for %#x", a)
		}
	}
}

// TestShamirKnownAnswer: hand-computed with the products above. Secret
// byte 0x42, k = 2, a1 = 0x57: f(1) = 0x42^0x57 = 0x15, f(2) = 0x42^0xae =
// 0xec, f(3) = 0x42^0x57^0xae = 0xbb.
func TestShamirKnownAnswer(t *testing.T) {
	shares, err := splitSecret(bytes.NewReader([]byte{0x57}), []byte{0x42}, 3, 2)
	if err != nil {
		t.Fatal(err)
	}
	want := []byte{0x15, 0xec, 0xbb}
	for i, s := range shares {
		if s.x != byte(i+1) || s.y[0] != want[i] {
			t.Errorf("share %d = (%d, %#x), want (%d, %#x)", i, s.x, s.y[0], i+1, want[i])
		}
	}
	for _, pair := range [][2]int{{0, 1}, {0, 2}, {1, 2}, {2, 0}} {
		got, err := combineShares([]share{shares[pair[0]], shares[pair[1]]})
		if err != nil || got[0] != 0x42 {
			t.Errorf("combine %v = %x, %v", pair, got, err)
		}
	}
	// k = 3 over two bytes with coefficients (a1, a2) = (0x01, 0x02) and (0x57, 0x13):
	// f(x) = s + a1·x + a2·x², e.g. byte 0 at x = 2: 0x00 ^ 2 ^ 2·4 = 0x0a.
	shares, err = splitSecret(bytes.NewReader([]byte{0x01, 0x57, 0x02, 0x13}), []byte{0x00, 0xff}, 4, 3)
	if err != nil {
		t.Fatal(err)
	}
	if shares[1].y[0] != 0x0a {
		t.Errorf("k=3 f(2) = %#x, want 0x0a", shares[1].y[0])
	}
	// byte 1 at x = 1: 0xff ^ 0x57 ^ 0x13 = 0xbb.
	if shares[0].y[1] != 0xbb {
		t.Errorf("k=3 f(1) byte 1 = %#x, want 0xbb", shares[0].y[1])
	}
}

// subsets calls fn with every size-r subset of 0..n-1.
func subsets(n, r int, fn func([]int)) {
	idx := make([]int, r)
	var rec func(start, depth int)
	rec = func(start, depth int) {
		if depth == r {
			fn(idx)
			return
		}
		for i := start; i < n; i++ {
			idx[depth] = i
			rec(i+1, depth+1)
		}
	}
	rec(0, 0)
}

func TestEveryKSubsetReconstructs(t *testing.T) {
	secret := make([]byte, 32)
	_, _ = rand.Read(secret)
	for _, c := range []struct{ n, k int }{{2, 2}, {3, 2}, {3, 3}, {5, 3}, {6, 4}, {7, 7}, {8, 5}} {
		shares, err := splitSecret(rand.Reader, secret, c.n, c.k)
		if err != nil {
			t.Fatal(err)
		}
		count := 0
		for r := c.k; r <= c.n; r++ {
			subsets(c.n, r, func(idx []int) {
				var sub []share
				for _, i := range idx {
					sub = append(sub, shares[i])
				}
				got, err := combineShares(sub)
				if err != nil || !bytes.Equal(got, secret) {
					t.Fatalf("%d-of-%d: subset %v does not reconstruct: %v", c.k, c.n, idx, err)
				}
				count++
			})
		}
		// k-1 shares interpolate a polynomial of too low a degree: never the secret
		// (except with probability 2^-256).
		subsets(c.n, c.k-1, func(idx []int) {
			if len(idx) < 2 {
				return
			}
			var sub []share
			for _, i := range idx {
				sub = append(sub, shares[i])
			}
			got, _ := combineShares(sub)
			if bytes.Equal(got, secret) {
				t.Fatalf("%d-of-%d: %d shares %v reconstruct the secret", c.k, c.n, len(idx), idx)
			}
		})
		if count == 0 {
			t.Fatal("no subset tried")
		}
	}
	big := make([]byte, 32)
	shares, err := splitSecret(rand.Reader, secret, 255, 200)
	if err != nil {
		t.Fatal(err)
	}
	if big, err = combineShares(shares[55:]); err != nil || !bytes.Equal(big, secret) {
		t.Fatalf("200 of 255: %v", err)
	}
}

// TestFewerThanKSharesAreUniform enumerates every coefficient vector: for
// k = 2 and k = 3, the k-1 shares at fixed x take every value exactly once
// whatever the secret, so their distribution is independent of it
// (perfect secrecy; the Vandermonde argument in shamir.go).
func TestFewerThanKSharesAreUniform(t *testing.T) {
	for _, xs := range [][]byte{{1}, {7}, {255}} { // k = 2: one share
		for _, s := range []byte{0x00, 0x01, 0x42, 0xff} {
			var seen [256]int
			for a := range 256 {
				seen[evalPoly(s, []byte{byte(a)}, 0, 1, xs[0])]++
			}
			for v, c := range seen {
				if c != 1 {
					t.Fatalf("k=2 x=%d s=%#x: share value %#x occurs %d times", xs[0], s, v, c)
				}
			}
		}
	}
	for _, xs := range [][2]byte{{1, 2}, {3, 200}, {254, 255}} { // k = 3: two shares
		for _, s := range []byte{0x00, 0x9c} {
			seen := make([]uint8, 1<<16)
			for a1 := range 256 {
				for a2 := range 256 {
					coef := []byte{byte(a1), byte(a2)}
					y1 := evalPoly(s, coef, 0, 1, xs[0])
					y2 := evalPoly(s, coef, 0, 1, xs[1])
					seen[int(y1)<<8|int(y2)]++
				}
			}
			for v, c := range seen {
				if c != 1 {
					t.Fatalf("k=3 x=%v s=%#x: share pair %#04x occurs %d times", xs, s, v, c)
				}
			}
		}
	}
}

// TestSingleShareStatistics: the real splitter (crypto/rand) gives one
// share whose value is uniform for a fixed secret: chi-square over 256
// bins with 255 degrees of freedom, bound at mean + 10 sd (p < 1e-15).
func TestSingleShareStatistics(t *testing.T) {
	const samples = 256 * 200
	var bins [256]int
	for range samples / 32 {
		shares, err := splitSecret(rand.Reader, make([]byte, 32), 3, 2) // secret all zero
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range shares[0].y {
			bins[b]++
		}
	}
	exp := float64(samples) / 256
	chi := 0.0
	for _, c := range bins {
		d := float64(c) - exp
		chi += d * d / exp
	}
	if chi > 255+10*22.6 {
		t.Fatalf("chi-square %.1f over 255 degrees of freedom: shares are not uniform", chi)
	}
}

func TestShamirRefusals(t *testing.T) {
	secret := []byte{1, 2, 3}
	for _, c := range []struct{ n, k int }{{3, 1}, {3, 4}, {256, 2}, {0, 0}} {
		if _, err := splitSecret(rand.Reader, secret, c.n, c.k); !errors.Is(err, ErrBadPolicy) {
			t.Errorf("split %d of %d: %v", c.k, c.n, err)
		}
	}
	if _, err := splitSecret(rand.Reader, nil, 3, 2); !errors.Is(err, ErrBadRequest) {
		t.Errorf("empty secret: %v", err)
	}
	if _, err := splitSecret(bytes.NewReader(nil), secret, 3, 2); err == nil {
		t.Error("a failing random source was not reported")
	}
	shares, _ := splitSecret(rand.Reader, secret, 3, 2)
	for name, sub := range map[string][]share{
		"one share":      shares[:1],
		"duplicate x":    {shares[0], shares[0]},
		"zero x":         {{x: 0, y: shares[0].y}, shares[1]},
		"unequal length": {shares[0], {x: 2, y: shares[1].y[:2]}},
		"empty":          {{x: 1}, {x: 2}},
	} {
		if _, err := combineShares(sub); !errors.Is(err, ErrBadRequest) {
			t.Errorf("%s: %v", name, err)
		}
	}
}
