package escrow

import (
	"fmt"
	"io"
)

// Shamir's secret sharing over GF(2^8), byte by byte: for each byte s of
// the secret, a polynomial f(x) = s + a1·x + … + a(k-1)·x^(k-1) with
// uniformly random coefficients (zero included: a forced non-zero leading
// coefficient would bias the shares), evaluated at x = 1..n.
//
// Why k-1 shares tell nothing: for distinct non-zero x1..x(k-1), the map
// (a1..a(k-1)) -> (f(x1)-s, …, f(x(k-1))-s) is linear with the Vandermonde
// matrix [xi^j] (i, j = 1..k-1), whose determinant is ∏xi · ∏(xj - xi) ≠ 0.
// It is therefore a bijection of GF(2^8)^(k-1): for every secret s the k-1
// share values are uniformly distributed, so their distribution does not
// depend on s. Any k shares determine f by Lagrange interpolation, and
// f(0) = s. TestFewerThanKSharesAreUniform checks this by enumeration.

// maxShares is the number of distinct non-zero x coordinates in GF(2^8).
const maxShares = 255

// share is one point (x, f(x)) of every byte's polynomial.
type share struct {
	x byte
	y []byte
}

// splitSecret splits secret into n shares (x = 1..n), any k of which
// recover it. 2 <= k <= n <= 255.
func splitSecret(rnd io.Reader, secret []byte, n, k int) ([]share, error) {
	if k < 2 || k > n || n > maxShares {
		return nil, fmt.Errorf("split: %w: %d of %d (want 2 <= k <= n <= %d)", ErrBadPolicy, k, n, maxShares)
	}
	if len(secret) == 0 {
		return nil, fmt.Errorf("split: %w: empty secret", ErrBadRequest)
	}
	coef := make([]byte, (k-1)*len(secret)) // coef[j*len+i]: a(j+1) of byte i
	defer clear(coef)
	if _, err := io.ReadFull(rnd, coef); err != nil {
		return nil, fmt.Errorf("split: %w", err)
	}
	shares := make([]share, n)
	for s := range shares {
		x := byte(s + 1)
		y := make([]byte, len(secret))
		for i := range secret {
			y[i] = evalPoly(secret[i], coef, i, len(secret), x)
		}
		shares[s] = share{x: x, y: y}
	}
	return shares, nil
}

// evalPoly evaluates s + a1·x + … by Horner's rule, where a(j+1) is
// coef[j*stride+i].
func evalPoly(s byte, coef []byte, i, stride int, x byte) byte {
	var acc byte
	for j := len(coef)/stride - 1; j >= 0; j-- {
		acc = gfMul(acc, x) ^ coef[j*stride+i]
	}
	return gfMul(acc, x) ^ s
}

// combineShares recovers the secret from at least two shares by Lagrange
// interpolation at x = 0. It refuses a zero or repeated x and shares of
// unequal length. Given k or more shares of one split it returns the
// secret; given fewer, or shares of different splits, it returns bytes
// unrelated to the secret (the bundle's AEAD tells the difference).
func combineShares(shares []share) ([]byte, error) {
	if len(shares) < 2 || len(shares) > maxShares {
		return nil, fmt.Errorf("combine: %w: %d shares (want 2..%d)", ErrBadRequest, len(shares), maxShares)
	}
	size := len(shares[0].y)
	var seen [256]bool
	for _, s := range shares {
		switch {
		case s.x == 0:
			return nil, fmt.Errorf("combine: %w: share with x = 0", ErrBadRequest)
		case seen[s.x]:
			return nil, fmt.Errorf("combine: %w: two shares with x = %d", ErrBadRequest, s.x)
		case len(s.y) != size || size == 0:
			return nil, fmt.Errorf("combine: %w: shares of unequal or zero length", ErrBadRequest)
		}
		seen[s.x] = true
	}
	out := make([]byte, size)
	for i, si := range shares {
		// Lagrange basis at 0: l_i = ∏_{j≠i} x_j / (x_j + x_i). The x are public.
		var num, den byte = 1, 1
		for j, sj := range shares {
			if i != j {
				num = gfMul(num, sj.x)
				den = gfMul(den, sj.x^si.x)
			}
		}
		li := gfMul(num, gfInv(den))
		for b := range out {
			out[b] ^= gfMul(li, si.y[b])
		}
	}
	return out, nil
}
