package attest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"encoding/binary"
	"errors"
	"math/big"

	"github.com/google/go-tpm/tpm2"
)

// Hand-written decoders for the two TPM structures of every verification
// (TPMS_ATTEST of a quote or certification, and TPMT_SIGNATURE). go-tpm's
// reflection-based Unmarshal plus the canonical re-marshal check costs
// more than the ECDSA verification itself. These decoders are a fast path
// only: they accept a subset of what ParseAttest / VerifyTPMSignature
// accept (the shapes a TPM produces) and, whenever they decline, the
// verifier falls back to the reflection path, so results and refusal
// messages are those of ParseAttest / VerifyTPMSignature. FuzzFastDecoders
// checks that whatever the fast path accepts, the reflection path accepts
// with the same fields.

// errFastDecline means the fast decoder does not handle the input.
var errFastDecline = errors.New("fast decoder declines")

type byteReader struct {
	b   []byte
	bad bool
}

func (r *byteReader) u8() uint8 {
	if len(r.b) < 1 {
		r.bad = true
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *byteReader) u16() uint16 {
	if len(r.b) < 2 {
		r.bad = true
		return 0
	}
	v := binary.BigEndian.Uint16(r.b)
	r.b = r.b[2:]
	return v
}

func (r *byteReader) u32() uint32 {
	if len(r.b) < 4 {
		r.bad = true
		return 0
	}
	v := binary.BigEndian.Uint32(r.b)
	r.b = r.b[4:]
	return v
}

func (r *byteReader) u64() uint64 {
	if len(r.b) < 8 {
		r.bad = true
		return 0
	}
	v := binary.BigEndian.Uint64(r.b)
	r.b = r.b[8:]
	return v
}

func (r *byteReader) bytes(n int) []byte {
	if len(r.b) < n {
		r.bad = true
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

// tpm2b reads a TPM2B (16-bit size, then the bytes).
func (r *byteReader) tpm2b() []byte { return r.bytes(int(r.u16())) }

// fastAttest is the part of a TPMS_ATTEST the verifier reads.
type fastAttest struct {
	typ        uint16
	extraData  []byte
	clock      uint64
	resetCount uint32
	// quote
	sels      []pcrSelection
	selErr    error // the selection is not one the verifier handles
	pcrDigest []byte
	// certify
	name, qualifiedName []byte
}

// decodeAttestFast decodes a TPMS_ATTEST of type wantType (quote or
// certify) or declines.
func decodeAttestFast(raw []byte, wantType uint16) (*fastAttest, error) {
	if len(raw) > maxTPMStructSize || (wantType != tpmSTAttestQuote && wantType != tpmSTAttestCertify) {
		return nil, errFastDecline
	}
	r := &byteReader{b: raw}
	a := &fastAttest{}
	if r.u32() != tpmGeneratedValue {
		return nil, errFastDecline
	}
	if a.typ = r.u16(); a.typ != wantType {
		return nil, errFastDecline
	}
	r.tpm2b() // qualifiedSigner
	a.extraData = r.tpm2b()
	a.clock = r.u64()
	a.resetCount = r.u32()
	r.u32() // restartCount
	if safe := r.u8(); safe > 1 {
		return nil, errFastDecline
	}
	r.u64() // firmwareVersion
	switch wantType {
	case tpmSTAttestQuote:
		n := r.u32()
		if n > maxPCRSelections {
			return nil, errFastDecline
		}
		for i := uint32(0); i < n && !r.bad; i++ {
			alg := r.u16()
			sel := r.bytes(int(r.u8()))
			bank, _, ok := bankForAlg(alg)
			if !ok || len(sel) > maxPCRSelectBytes {
				return nil, errFastDecline
			}
			s := pcrSelection{Bank: bank}
			for j, b := range sel {
				for bit := 0; bit < 8; bit++ {
					if b&(1<<bit) != 0 {
						s.PCRs = append(s.PCRs, j*8+bit)
					}
				}
			}
			a.sels = append(a.sels, s)
		}
		a.pcrDigest = r.tpm2b()
	case tpmSTAttestCertify:
		a.name = r.tpm2b()
		a.qualifiedName = r.tpm2b()
	}
	if r.bad || len(r.b) != 0 {
		return nil, errFastDecline
	}
	return a, nil
}

// fastSignature is a decoded RSASSA, RSAPSS or ECDSA TPMT_SIGNATURE.
type fastSignature struct {
	alg  tpm2.TPMAlgID
	hash crypto.Hash
	rsa  []byte
	r, s []byte
}

func hashOf(alg uint16) (crypto.Hash, bool) {
	switch alg {
	case algSHA1:
		return crypto.SHA1, true
	case algSHA256:
		return crypto.SHA256, true
	case algSHA384:
		return crypto.SHA384, true
	case algSHA512:
		return crypto.SHA512, true
	}
	return 0, false
}

func decodeSignatureFast(raw []byte) (*fastSignature, error) {
	if len(raw) > maxTPMStructSize {
		return nil, errFastDecline
	}
	r := &byteReader{b: raw}
	s := &fastSignature{alg: tpm2.TPMAlgID(r.u16())}
	h, ok := hashOf(r.u16())
	if !ok {
		return nil, errFastDecline
	}
	s.hash = h
	switch s.alg {
	case tpm2.TPMAlgRSASSA, tpm2.TPMAlgRSAPSS:
		s.rsa = r.tpm2b()
	case tpm2.TPMAlgECDSA:
		s.r = r.tpm2b()
		s.s = r.tpm2b()
	default:
		return nil, errFastDecline
	}
	if r.bad || len(r.b) != 0 {
		return nil, errFastDecline
	}
	return s, nil
}

// verifySignatureFast verifies a decoded signature by key over msg, with
// the same rules as VerifyTPMSignature (SHA-1 refused).
func verifySignatureFast(key crypto.PublicKey, s *fastSignature, msg []byte) (crypto.Hash, error) {
	if s.hash == crypto.SHA1 {
		return s.hash, ErrSHA1Signature
	}
	d := digestOf(s.hash, msg)
	switch s.alg {
	case tpm2.TPMAlgRSASSA, tpm2.TPMAlgRSAPSS:
		k, ok := key.(*rsa.PublicKey)
		if !ok {
			return 0, errFastDecline
		}
		if s.alg == tpm2.TPMAlgRSASSA {
			return s.hash, rsa.VerifyPKCS1v15(k, s.hash, d, s.rsa)
		}
		return s.hash, rsa.VerifyPSS(k, s.hash, d, s.rsa, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto})
	case tpm2.TPMAlgECDSA:
		k, ok := key.(*ecdsa.PublicKey)
		if !ok {
			return 0, errFastDecline
		}
		if !ecdsa.Verify(k, d, new(big.Int).SetBytes(s.r), new(big.Int).SetBytes(s.s)) {
			return s.hash, errors.New("ECDSA verification failure")
		}
		return s.hash, nil
	}
	return 0, errFastDecline
}

// verifyTPMSignature verifies sigRaw by key over msg through the fast path
// when it applies, else through VerifyTPMSignature. A signature the fast
// path rejects is re-checked by VerifyTPMSignature, so the outcome and
// message are always VerifyTPMSignature's.
func verifyTPMSignature(key crypto.PublicKey, sigRaw, msg []byte) (crypto.Hash, error) {
	if s, err := decodeSignatureFast(sigRaw); err == nil {
		if h, err := verifySignatureFast(key, s, msg); err == nil || errors.Is(err, ErrSHA1Signature) {
			return h, err
		}
	}
	return VerifyTPMSignature(key, sigRaw, msg)
}

// decodeAttest decodes a TPMS_ATTEST through the fast path when it applies,
// else through ParseAttest (whose errors it returns).
func decodeAttest(raw []byte, wantType uint16) (*fastAttest, error) {
	if a, err := decodeAttestFast(raw, wantType); err == nil {
		return a, nil
	}
	att, err := ParseAttest(raw, wantType)
	if err != nil {
		return nil, err
	}
	a := &fastAttest{typ: uint16(att.A.Type), extraData: att.A.ExtraData.Buffer, clock: att.A.ClockInfo.Clock, resetCount: att.A.ClockInfo.ResetCount}
	switch wantType {
	case tpmSTAttestQuote:
		info, err := att.A.Attested.Quote()
		if err != nil {
			return nil, tpmErr("TPMS_ATTEST", "no quote info: %v", err)
		}
		a.sels, a.selErr = selections(info.PCRSelect)
		a.pcrDigest = info.PCRDigest.Buffer
	case tpmSTAttestCertify:
		info, err := att.A.Attested.Certify()
		if err != nil {
			return nil, tpmErr("TPMS_ATTEST", "no certify info: %v", err)
		}
		a.name, a.qualifiedName = info.Name.Buffer, info.QualifiedName.Buffer
	}
	return a, nil
}
