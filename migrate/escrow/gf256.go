package escrow

// Arithmetic in GF(2^8) with the AES reduction polynomial
// x^8 + x^4 + x^3 + x + 1 (0x11b), the field of HashiCorp Vault's and
// ssss's Shamir splitting. Addition is XOR.
//
// Multiplication is bit-serial with masks instead of log/exp tables: eight
// rounds of shift-and-conditional-XOR whose every step runs whatever the
// operands are, so neither the time nor the memory accessed depends on a
// secret byte (tables leak the index through the cache). The inverse is
// a^254, a fixed chain of squarings and products, so it is constant-time as
// well, and maps 0 to 0 without a branch. The sizes involved (at most 255
// shares of 32 bytes) make the cost irrelevant: about 20 ns per product.

// gfMul returns a·b in GF(2^8).
func gfMul(a, b byte) byte {
	var p byte
	for range 8 {
		p ^= -(b & 1) & a // add a when the low bit of b is set
		hi := -(a >> 7)   // 0xff when a's top bit is set
		a = a<<1 ^ hi&0x1b
		b >>= 1
	}
	return p
}

// gfInv returns a^-1 (a^254); gfInv(0) is 0.
func gfInv(a byte) byte {
	a2 := gfMul(a, a)     // a^2
	a3 := gfMul(a2, a)    // a^3
	a6 := gfMul(a3, a3)   // a^6
	a12 := gfMul(a6, a6)  // a^12
	a15 := gfMul(a12, a3) // a^15
	a30 := gfMul(a15, a15)
	a60 := gfMul(a30, a30)
	a120 := gfMul(a60, a60)
	a127 := gfMul(a120, gfMul(a6, a)) // a^127 = a^120 · a^7
	return gfMul(a127, a127)          // a^254
}
