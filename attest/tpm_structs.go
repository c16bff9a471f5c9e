package attest

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"

	"github.com/google/go-tpm/tpm2"
)

// Limits for TPM structures (TPMT_PUBLIC is < 1 KiB, TPMS_ATTEST < 2 KiB).
const maxTPMStructSize = 4096

const (
	tpmGeneratedValue   = 0xff544347
	tpmSTAttestQuote    = 0x8018
	tpmSTAttestCertify  = 0x8017
	maxPCRSelectBytes   = 8
	maxPCRSelections    = 8
	tpmStructHeaderSize = 6
)

func tpmErr(what string, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrMalformedTPMStruct, what, fmt.Sprintf(format, args...))
}

// unmarshal wraps tpm2.Unmarshal: it bounds the size, recovers from panics
// and requires the structure to use every input byte (it re-marshals and
// compares, so a name or signature computed later covers exactly the input).
func unmarshal[T tpm2.Marshallable, P interface {
	*T
	tpm2.Unmarshallable
}](what string, b []byte) (v *T, err error) {
	if len(b) == 0 {
		return nil, tpmErr(what, "empty")
	}
	if len(b) > maxTPMStructSize {
		return nil, tpmErr(what, "%d bytes exceeds the %d-byte limit", len(b), maxTPMStructSize)
	}
	defer func() {
		if r := recover(); r != nil {
			v, err = nil, tpmErr(what, "%v", r)
		}
	}()
	v, err = tpm2.Unmarshal[T, P](b)
	if err != nil {
		return nil, tpmErr(what, "%v", err)
	}
	if !bytes.Equal(tpm2.Marshal(*v), b) {
		return nil, tpmErr(what, "trailing or non-canonical bytes")
	}
	return v, nil
}

// Public is a parsed TPMT_PUBLIC with its exact bytes. Treat it as
// read-only: the verifier shares parsed public areas between calls.
type Public struct {
	Raw []byte
	Pub *tpm2.TPMTPublic

	// Computed once by prepare (cached public areas), else on demand.
	prepared bool
	name     []byte
	nameErr  error
	digest   []byte
	key      crypto.PublicKey
	keyErr   error
}

// ParsePublic parses a TPMT_PUBLIC (no TPM2B size prefix).
func ParsePublic(what string, raw []byte) (*Public, error) {
	p, err := unmarshal[tpm2.TPMTPublic](what, raw)
	if err != nil {
		return nil, err
	}
	return &Public{Raw: raw, Pub: p}, nil
}

// prepare computes the name, digest and Go key once, so that a cached
// Public answers without work and is never written again.
func (p *Public) prepare() {
	p.name, p.nameErr = p.computeName()
	p.digest = p.computeDigest()
	p.key, p.keyErr = p.computeKey()
	p.prepared = true
}

// Name returns the TPM Name: nameAlg || H_nameAlg(TPMT_PUBLIC bytes).
func (p *Public) Name() ([]byte, error) {
	if p.prepared {
		return bytes.Clone(p.name), p.nameErr
	}
	return p.computeName()
}

func (p *Public) computeName() ([]byte, error) {
	h, err := p.Pub.NameAlg.Hash()
	if err != nil {
		return nil, fmt.Errorf("%w: nameAlg %v: %v", ErrMalformedTPMStruct, p.Pub.NameAlg, err)
	}
	out := binary.BigEndian.AppendUint16(nil, uint16(p.Pub.NameAlg))
	hh := h.New()
	hh.Write(p.Raw)
	return hh.Sum(out), nil
}

// Digest is SHA-256 over the TPMT_PUBLIC bytes; it identifies an EK in
// enrolment records.
func (p *Public) Digest() []byte {
	if p.prepared {
		return bytes.Clone(p.digest)
	}
	return p.computeDigest()
}

func (p *Public) computeDigest() []byte {
	d := sha256.Sum256(p.Raw)
	return d[:]
}

// CryptoKey returns the Go public key (*rsa.PublicKey or *ecdsa.PublicKey).
// Do not modify it: cached public areas share it.
func (p *Public) CryptoKey() (crypto.PublicKey, error) {
	if p.prepared {
		return p.key, p.keyErr
	}
	return p.computeKey()
}

func (p *Public) computeKey() (crypto.PublicKey, error) {
	switch p.Pub.Type {
	case tpm2.TPMAlgRSA:
		parms, err := p.Pub.Parameters.RSADetail()
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrMalformedTPMStruct, err)
		}
		u, err := p.Pub.Unique.RSA()
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrMalformedTPMStruct, err)
		}
		if len(u.Buffer) < 128 {
			return nil, fmt.Errorf("%w: RSA modulus of %d bytes", ErrMalformedTPMStruct, len(u.Buffer))
		}
		return tpm2.RSAPub(parms, u)
	case tpm2.TPMAlgECC:
		parms, err := p.Pub.Parameters.ECCDetail()
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrMalformedTPMStruct, err)
		}
		u, err := p.Pub.Unique.ECC()
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrMalformedTPMStruct, err)
		}
		k, err := tpm2.ECDSAPub(parms, u)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrMalformedTPMStruct, err)
		}
		if !k.Curve.IsOnCurve(k.X, k.Y) {
			return nil, fmt.Errorf("%w: ECC point not on curve", ErrMalformedTPMStruct)
		}
		return k, nil
	}
	return nil, fmt.Errorf("%w: key type %v unsupported", ErrMalformedTPMStruct, p.Pub.Type)
}

// sameKey reports whether two Go public keys are equal.
func sameKey(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	if e, ok := a.(equaler); ok {
		return e.Equal(b)
	}
	return false
}

// Attest is a parsed TPMS_ATTEST with its exact bytes (what the AK signed).
type Attest struct {
	Raw []byte
	A   *tpm2.TPMSAttest
}

// ParseAttest parses a TPMS_ATTEST and checks its magic and type.
func ParseAttest(raw []byte, wantType uint16) (*Attest, error) {
	if len(raw) < tpmStructHeaderSize {
		return nil, tpmErr("TPMS_ATTEST", "truncated (%d bytes)", len(raw))
	}
	if m := binary.BigEndian.Uint32(raw); m != tpmGeneratedValue {
		return nil, tpmErr("TPMS_ATTEST", "magic 0x%08x, want 0x%08x (TPM_GENERATED_VALUE)", m, tpmGeneratedValue)
	}
	if t := binary.BigEndian.Uint16(raw[4:]); t != wantType {
		return nil, tpmErr("TPMS_ATTEST", "type 0x%04x, want 0x%04x", t, wantType)
	}
	a, err := unmarshal[tpm2.TPMSAttest]("TPMS_ATTEST", raw)
	if err != nil {
		return nil, err
	}
	return &Attest{Raw: raw, A: a}, nil
}

// VerifyTPMSignature checks a TPMT_SIGNATURE by key over msg. Supported:
// RSASSA, RSAPSS and ECDSA with SHA-256/384/512. SHA-1 signatures are
// refused (ErrSHA1Signature): they are accepted on EK certificate paths
// only. It returns the hash used.
func VerifyTPMSignature(key crypto.PublicKey, sigRaw, msg []byte) (crypto.Hash, error) {
	sig, err := unmarshal[tpm2.TPMTSignature]("TPMT_SIGNATURE", sigRaw)
	if err != nil {
		return 0, err
	}
	var hashAlg tpm2.TPMIAlgHash
	switch sig.SigAlg {
	case tpm2.TPMAlgRSASSA, tpm2.TPMAlgRSAPSS:
		var s *tpm2.TPMSSignatureRSA
		if sig.SigAlg == tpm2.TPMAlgRSASSA {
			s, err = sig.Signature.RSASSA()
		} else {
			s, err = sig.Signature.RSAPSS()
		}
		if err != nil {
			return 0, tpmErr("TPMT_SIGNATURE", "%v", err)
		}
		hashAlg = s.Hash
		h, err := hashAlg.Hash()
		if err != nil {
			return 0, tpmErr("TPMT_SIGNATURE", "hash %v", hashAlg)
		}
		if h == crypto.SHA1 {
			return h, ErrSHA1Signature
		}
		k, ok := key.(*rsa.PublicKey)
		if !ok {
			return 0, fmt.Errorf("RSA signature but the key is %T", key)
		}
		d := digestOf(h, msg)
		if sig.SigAlg == tpm2.TPMAlgRSASSA {
			return h, rsa.VerifyPKCS1v15(k, h, d, s.Sig.Buffer)
		}
		return h, rsa.VerifyPSS(k, h, d, s.Sig.Buffer, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto})
	case tpm2.TPMAlgECDSA:
		s, err := sig.Signature.ECDSA()
		if err != nil {
			return 0, tpmErr("TPMT_SIGNATURE", "%v", err)
		}
		h, err := s.Hash.Hash()
		if err != nil {
			return 0, tpmErr("TPMT_SIGNATURE", "hash %v", s.Hash)
		}
		if h == crypto.SHA1 {
			return h, ErrSHA1Signature
		}
		k, ok := key.(*ecdsa.PublicKey)
		if !ok {
			return 0, fmt.Errorf("ECDSA signature but the key is %T", key)
		}
		r := new(big.Int).SetBytes(s.SignatureR.Buffer)
		ss := new(big.Int).SetBytes(s.SignatureS.Buffer)
		if !ecdsa.Verify(k, digestOf(h, msg), r, ss) {
			return h, errors.New("ECDSA verification failure")
		}
		return h, nil
	}
	return 0, tpmErr("TPMT_SIGNATURE", "signature scheme %v unsupported", sig.SigAlg)
}

func digestOf(h crypto.Hash, msg []byte) []byte {
	hh := h.New()
	hh.Write(msg)
	return hh.Sum(nil)
}

// pcrSelection lists the (bank, PCR indices) pairs of a quote, in order.
type pcrSelection struct {
	Bank Bank
	PCRs []int
}

func selections(l tpm2.TPMLPCRSelection) ([]pcrSelection, error) {
	if len(l.PCRSelections) > maxPCRSelections {
		return nil, tpmErr("TPML_PCR_SELECTION", "%d selections", len(l.PCRSelections))
	}
	var out []pcrSelection
	for _, s := range l.PCRSelections {
		bank, _, ok := bankForAlg(uint16(s.Hash))
		if !ok {
			return nil, tpmErr("TPML_PCR_SELECTION", "bank %v unsupported", s.Hash)
		}
		if len(s.PCRSelect) > maxPCRSelectBytes {
			return nil, tpmErr("TPML_PCR_SELECTION", "%d-byte bitmap", len(s.PCRSelect))
		}
		sel := pcrSelection{Bank: bank}
		for i, b := range s.PCRSelect {
			for bit := 0; bit < 8; bit++ {
				if b&(1<<bit) != 0 {
					sel.PCRs = append(sel.PCRs, i*8+bit)
				}
			}
		}
		out = append(out, sel)
	}
	return out, nil
}
