package attest

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"fmt"
	"math/big"
	"strings"
	"time"
)

// maxCertSize bounds a single DER certificate; real EK certificates are < 2 KiB.
const maxCertSize = 64 << 10

// Cert is a leniently parsed X.509 certificate: only what chain verification
// needs. It accepts encodings crypto/x509 refuses (non-minimal serial
// INTEGERs, id-RSAES-OAEP SPKI, unhandled critical extensions); signatures are
// still checked over the exact TBS bytes.
type Cert struct {
	Raw          []byte // the whole certificate DER
	RawTBS       []byte // TBSCertificate, including its tag and length
	RawIssuer    []byte // issuer Name DER
	RawSubject   []byte // subject Name DER
	RawSPKI      []byte // SubjectPublicKeyInfo DER
	Serial       *big.Int
	SigAlg       asn1.ObjectIdentifier
	SigParams    []byte // raw AlgorithmIdentifier parameters (RSASSA-PSS)
	Signature    []byte
	NotBefore    time.Time // zero if unparseable
	NotAfter     time.Time // zero if unparseable
	IsCA         bool      // basicConstraints cA
	HasBasicCons bool
	SubjectKeyID []byte
	AuthorityKey []byte
	PublicKey    crypto.PublicKey // *rsa.PublicKey or *ecdsa.PublicKey; nil if unsupported
	PublicKeyAlg asn1.ObjectIdentifier
	// HasKeyUsage reports a keyUsage extension; KeyUsage holds its bits
	// (x509.KeyUsage numbering: digitalSignature = 1, keyEncipherment = 4...).
	HasKeyUsage bool
	KeyUsage    x509.KeyUsage
	// ExtKeyUsage lists the extendedKeyUsage OIDs (nil: no extension).
	ExtKeyUsage []asn1.ObjectIdentifier
	// RawSAN is the subjectAltName extension value (the GeneralNames DER),
	// nil when absent.
	RawSAN []byte
}

var (
	oidRSAEncryption = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 1}
	oidRSAESOAEP     = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 7}
	oidRSASSAPSS     = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 10}
	oidECPublicKey   = asn1.ObjectIdentifier{1, 2, 840, 10045, 2, 1}
	oidSHA1WithRSA   = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 5}
	oidSHA256WithRSA = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 11}
	oidSHA384WithRSA = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 12}
	oidSHA512WithRSA = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 13}
	oidECDSAWithSHA1 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 1}
	oidECDSAWithS256 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}
	oidECDSAWithS384 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 3}
	oidECDSAWithS512 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 4}
	oidSHA1          = asn1.ObjectIdentifier{1, 3, 14, 3, 2, 26}
	oidSHA256        = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 1}
	oidSHA384        = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 2}
	oidSHA512        = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 3}
	oidExtBasicCons  = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidExtSKI        = asn1.ObjectIdentifier{2, 5, 29, 14}
	oidExtAKI        = asn1.ObjectIdentifier{2, 5, 29, 35}
	oidExtKeyUsage   = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidExtEKU        = asn1.ObjectIdentifier{2, 5, 29, 37}
	oidExtSAN        = asn1.ObjectIdentifier{2, 5, 29, 17}
)

func certErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrMalformedCertificate, fmt.Sprintf(format, args...))
}

// ParseCertificate leniently parses one DER certificate. Trailing bytes after
// the outer SEQUENCE are ignored (NV-stored certificates are padded).
func ParseCertificate(der []byte) (c *Cert, err error) {
	if len(der) > maxCertSize {
		return nil, certErr("%d bytes exceeds the %d-byte limit", len(der), maxCertSize)
	}
	outer, _, err := expect(der, tagSequence)
	if err != nil {
		return nil, certErr("no outer SEQUENCE")
	}
	c = &Cert{Raw: append([]byte(nil), outer.full...)}
	body := c.Raw[len(outer.full)-len(outer.content):]
	tbs, body, err := expect(body, tagSequence)
	if err != nil {
		return nil, certErr("no TBSCertificate")
	}
	c.RawTBS = tbs.full
	alg, body, err := expect(body, tagSequence)
	if err != nil {
		return nil, certErr("no signatureAlgorithm")
	}
	if c.SigAlg, c.SigParams, err = readAlgID(alg); err != nil {
		return nil, err
	}
	sig, _, err := expect(body, tagBitString)
	if err != nil {
		return nil, certErr("no signature BIT STRING")
	}
	if c.Signature, err = bitStringBytes(sig); err != nil {
		return nil, certErr("bad signature BIT STRING")
	}
	if err := c.parseTBS(tbs.content); err != nil {
		return nil, err
	}
	return c, nil
}

func readAlgID(alg derElem) (asn1.ObjectIdentifier, []byte, error) {
	o, rest, err := expect(alg.content, tagOID)
	if err != nil {
		return nil, nil, certErr("bad AlgorithmIdentifier")
	}
	oid, err := parseOID(o)
	if err != nil {
		return nil, nil, certErr("bad AlgorithmIdentifier OID")
	}
	return oid, rest, nil
}

func (c *Cert) parseTBS(tbs []byte) error {
	var err error
	// [0] EXPLICIT version, optional.
	if _, tbs, _, err = optional(tbs, 0xa0); err != nil {
		return certErr("bad version")
	}
	// Serial: the raw INTEGER content without the minimality check
	// crypto/x509 applies (STMicro's intermediate encodes 5 as 00 00 00 05).
	serial, tbs, err := expect(tbs, tagInteger)
	if err != nil || len(serial.content) == 0 || len(serial.content) > 64 {
		return certErr("bad serial number")
	}
	c.Serial = new(big.Int).SetBytes(serial.content)
	if _, tbs, err = expect(tbs, tagSequence); err != nil {
		return certErr("bad TBS signature algorithm")
	}
	issuer, tbs, err := expect(tbs, tagSequence)
	if err != nil {
		return certErr("bad issuer")
	}
	c.RawIssuer = issuer.full
	validity, tbs, err := expect(tbs, tagSequence)
	if err != nil {
		return certErr("bad validity")
	}
	var rest []byte
	c.NotBefore, rest = readTime(validity.content)
	c.NotAfter, _ = readTime(rest)
	subject, tbs, err := expect(tbs, tagSequence)
	if err != nil {
		return certErr("bad subject")
	}
	c.RawSubject = subject.full
	spki, tbs, err := expect(tbs, tagSequence)
	if err != nil {
		return certErr("bad subjectPublicKeyInfo")
	}
	c.RawSPKI = spki.full
	if err := c.parseSPKI(spki); err != nil {
		return err
	}
	// issuerUniqueID [1], subjectUniqueID [2] (primitive or constructed).
	for _, t := range []byte{0x81, 0xa1, 0x82, 0xa2} {
		if _, tbs, _, err = optional(tbs, t); err != nil {
			return certErr("bad unique ID")
		}
	}
	exts, _, ok, err := optional(tbs, 0xa3)
	if err != nil {
		return certErr("bad extensions")
	}
	if ok {
		return c.parseExtensions(exts.content)
	}
	return nil
}

// readTime reads a UTCTime or GeneralizedTime; an unparseable time is
// skipped and returned as the zero time (validity is only a policy knob).
func readTime(b []byte) (time.Time, []byte) {
	e, rest, err := readDER(b)
	if err != nil {
		return time.Time{}, nil
	}
	var t time.Time
	if e.tag == tagUTCTime || e.tag == tagGenTime {
		if r, err := asn1.Unmarshal(e.full, &t); err == nil && len(r) == 0 {
			return t, rest
		}
	}
	return time.Time{}, rest
}

func (c *Cert) parseSPKI(spki derElem) error {
	alg, rest, err := expect(spki.content, tagSequence)
	if err != nil {
		return certErr("bad subjectPublicKeyInfo algorithm")
	}
	bits, _, err := expect(rest, tagBitString)
	if err != nil {
		return certErr("bad subjectPublicKeyInfo key")
	}
	oid, _, err := readAlgID(alg)
	if err != nil {
		return err
	}
	c.PublicKeyAlg = oid
	key, err := bitStringBytes(bits)
	if err != nil {
		return certErr("bad subjectPublicKeyInfo key")
	}
	switch {
	case oid.Equal(oidRSAEncryption), oid.Equal(oidRSAESOAEP), oid.Equal(oidRSASSAPSS):
		// The BIT STRING is a PKCS#1 RSAPublicKey whatever the algorithm
		// OID says (TPM 1.2 EKs use id-RSAES-OAEP with label "TCPA").
		if k, err := x509.ParsePKCS1PublicKey(key); err == nil {
			c.PublicKey = k
		}
	case oid.Equal(oidECPublicKey):
		if k, err := x509.ParsePKIXPublicKey(spki.full); err == nil {
			c.PublicKey = k
		}
	}
	return nil
}

func (c *Cert) parseExtensions(b []byte) error {
	seq, _, err := expect(b, tagSequence)
	if err != nil {
		return certErr("bad extensions SEQUENCE")
	}
	for rest := seq.content; len(rest) > 0; {
		var ext derElem
		if ext, rest, err = expect(rest, tagSequence); err != nil {
			return certErr("bad extension")
		}
		o, er, err := expect(ext.content, tagOID)
		if err != nil {
			return certErr("bad extension OID")
		}
		oid, err := parseOID(o)
		if err != nil {
			return certErr("bad extension OID")
		}
		if _, er, _, err = optional(er, tagBoolean); err != nil {
			return certErr("bad extension critical flag")
		}
		value, _, err := expect(er, tagOctetString)
		if err != nil {
			return certErr("bad extension value")
		}
		switch {
		case oid.Equal(oidExtBasicCons):
			c.HasBasicCons = true
			if bc, _, err := expect(value.content, tagSequence); err == nil {
				if b, _, ok, _ := optional(bc.content, tagBoolean); ok && len(b.content) == 1 {
					c.IsCA = b.content[0] != 0 // lenient: any non-zero is TRUE
				}
			}
		case oid.Equal(oidExtSKI):
			if id, _, err := expect(value.content, tagOctetString); err == nil {
				c.SubjectKeyID = id.content
			}
		case oid.Equal(oidExtAKI):
			if aki, _, err := expect(value.content, tagSequence); err == nil {
				if id, _, ok, _ := optional(aki.content, 0x80); ok {
					c.AuthorityKey = id.content
				}
			}
		case oid.Equal(oidExtKeyUsage):
			c.HasKeyUsage = true
			if bits, _, err := expect(value.content, tagBitString); err == nil && len(bits.content) >= 1 {
				// DER BIT STRING: bit 0 is the most significant bit of the
				// first content octet (x509.KeyUsage numbers it 1 << 0).
				for i, b := range bits.content[1:] {
					for j := 0; j < 8 && i*8+j < 16; j++ {
						if b&(0x80>>j) != 0 {
							c.KeyUsage |= 1 << (i*8 + j)
						}
					}
				}
			}
		case oid.Equal(oidExtEKU):
			c.ExtKeyUsage = []asn1.ObjectIdentifier{}
			if seq, _, err := expect(value.content, tagSequence); err == nil {
				for r := seq.content; len(r) > 0; {
					var o derElem
					if o, r, err = expect(r, tagOID); err != nil {
						return certErr("bad extendedKeyUsage")
					}
					eku, err := parseOID(o)
					if err != nil {
						return certErr("bad extendedKeyUsage OID")
					}
					c.ExtKeyUsage = append(c.ExtKeyUsage, eku)
				}
			}
		case oid.Equal(oidExtSAN):
			c.RawSAN = value.content
		}
	}
	return nil
}

// Subject returns the subject as a readable string ("" for an empty subject).
func (c *Cert) Subject() string { return nameString(c.RawSubject) }

// Issuer returns the issuer as a readable string.
func (c *Cert) Issuer() string { return nameString(c.RawIssuer) }

// SelfSigned reports whether issuer and subject are the same name.
func (c *Cert) SelfSigned() bool { return sameName(c.RawIssuer, c.RawSubject) }

// Label is a short human identification: the subject, or the serial when
// the subject is empty (TPM EK certificates often have an empty subject).
func (c *Cert) Label() string {
	if s := c.Subject(); s != "" {
		return s
	}
	return fmt.Sprintf("(empty subject, serial %x)", c.Serial)
}

func nameString(raw []byte) string {
	var rdn pkix.RDNSequence
	if rest, err := asn1.Unmarshal(raw, &rdn); err != nil || len(rest) != 0 {
		return fmt.Sprintf("(unparseable name %x)", raw)
	}
	var n pkix.Name
	n.FillFromRDNSequence(&rdn)
	return n.String()
}

// sameName compares two DER Names: byte-equal, or equal after decoding
// (string types differ between some issuers and their CA certificates).
func sameName(a, b []byte) bool {
	if bytes.Equal(a, b) {
		return true
	}
	sa, sb := nameString(a), nameString(b)
	if strings.HasPrefix(sa, "(unparseable") || strings.HasPrefix(sb, "(unparseable") {
		return false
	}
	return strings.EqualFold(sa, sb)
}

// ParseCertificates reads every certificate in data: PEM (several blocks,
// text before or between them is ignored), DER, or DER with the TCG NV
// header (0x10 0x01 + 2-byte size, optionally followed by 0x10 0x02 tag) as
// read from the TPM's EK certificate NV index.
func ParseCertificates(data []byte) ([]*Cert, error) {
	if bytes.Contains(data, []byte("-----BEGIN")) {
		var out []*Cert
		rest := data
		for {
			var block *pem.Block
			block, rest = pem.Decode(rest)
			if block == nil {
				break
			}
			if block.Type != "CERTIFICATE" {
				continue
			}
			c, err := ParseCertificate(block.Bytes)
			if err != nil {
				return nil, err
			}
			out = append(out, c)
		}
		if len(out) == 0 {
			return nil, certErr("no CERTIFICATE PEM block")
		}
		return out, nil
	}
	der := StripNVHeader(data)
	c, err := ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return []*Cert{c}, nil
}

// StripNVHeader removes the TCG PC Client NV certificate header (tag 0x1001,
// a 16-bit size, and on TPM 1.2 parts the 0x1002 certificate tag and a
// one-byte type) that precedes the DER in some EK certificate NV indices.
// Input without such a header is returned unchanged.
func StripNVHeader(b []byte) []byte {
	if len(b) < 4 || b[0] != 0x10 || b[1] != 0x01 {
		return b
	}
	for i := 4; i < len(b) && i <= 8; i++ {
		if b[i] == 0x30 { // outer SEQUENCE starts here
			return b[i:]
		}
	}
	return b
}
