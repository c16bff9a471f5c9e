package attest

import (
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"fmt"
	"strings"
	"time"
)

// AK certificates: what the verifier checks (docs/attestation.md, "AK
// certificates").
//
//   - ak-cert-chain / ak-cert-signature / ak-cert-validity: the path from
//     the AK certificate to one of the verifier's AK roots, every signature
//     checked; SHA-1 is never accepted here; validity is enforced unless
//     ak_certificate.skip_validity.
//   - ak-cert-key: the certified key is the AK in the evidence.
//   - ak-cert-usage: the certificate fits a restricted signing key.
//   - ak-cert-binding: where the certificate names the TPM, it names the
//     TPM of the EK in the evidence.

// TCG and PKIX object identifiers used by AK certificates.
var (
	oidTCGArc               = asn1.ObjectIdentifier{2, 23, 133}
	oidAnyExtKeyUsage       = asn1.ObjectIdentifier{2, 5, 29, 37, 0}
	oidPermanentIdentifier  = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 8, 3} // RFC 4043
	oidHardwareModuleName   = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 8, 4} // RFC 4108
	oidTCGEKPermIDSHA256    = asn1.ObjectIdentifier{2, 23, 133, 12, 1}         // tcg-on-ekPermIdSha256
	oidTCGTPMManufacturer   = asn1.ObjectIdentifier{2, 23, 133, 2, 1}
	oidTCGTPMModel          = asn1.ObjectIdentifier{2, 23, 133, 2, 2}
	oidTCGTPMVersion        = asn1.ObjectIdentifier{2, 23, 133, 2, 3}
	oidTCGKPAIKCertificate  = asn1.ObjectIdentifier{2, 23, 133, 8, 3}
	forbiddenAKCertKeyUsage = x509.KeyUsageKeyEncipherment | x509.KeyUsageDataEncipherment | x509.KeyUsageKeyAgreement |
		x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageEncipherOnly | x509.KeyUsageDecipherOnly
)

// tpmSAN is what a certificate's subjectAltName says about the TPM.
type tpmSAN struct {
	ekPermIDs []string          // TCG EK permanent identifiers (hex SHA-256)
	hwModules []hwModule        // RFC 4108 hardware module names
	tpm       map[string]string // TPM manufacturer/model/version (directoryName)
}

type hwModule struct {
	Type   asn1.ObjectIdentifier
	Serial []byte
}

var tpmAttrNames = map[string]string{
	oidTCGTPMManufacturer.String(): "manufacturer",
	oidTCGTPMModel.String():        "model",
	oidTCGTPMVersion.String():      "version",
}

// parseTPMSAN reads the parts of a subjectAltName vtpmm understands;
// everything else is ignored. Malformed DER is an error.
func parseTPMSAN(raw []byte) (tpmSAN, error) {
	out := tpmSAN{tpm: map[string]string{}}
	if len(raw) == 0 {
		return out, nil
	}
	seq, _, err := expect(raw, tagSequence)
	if err != nil {
		return out, certErr("subjectAltName: not a SEQUENCE")
	}
	for rest := seq.content; len(rest) > 0; {
		var gn derElem
		if gn, rest, err = readDER(rest); err != nil {
			return out, certErr("subjectAltName: bad GeneralName")
		}
		switch gn.tag {
		case 0xa0: // otherName: type-id OID, value [0] EXPLICIT ANY
			o, r, err := expect(gn.content, tagOID)
			if err != nil {
				return out, certErr("subjectAltName: bad otherName")
			}
			typ, err := parseOID(o)
			if err != nil {
				return out, certErr("subjectAltName: bad otherName OID")
			}
			val, _, err := expect(r, 0xa0)
			if err != nil {
				return out, certErr("subjectAltName: bad otherName value")
			}
			switch {
			case typ.Equal(oidPermanentIdentifier):
				var pid struct {
					Value    string                `asn1:"utf8,optional"`
					Assigner asn1.ObjectIdentifier `asn1:"optional"`
				}
				if r, err := asn1.Unmarshal(val.content, &pid); err != nil || len(r) != 0 {
					return out, certErr("subjectAltName: bad PermanentIdentifier")
				}
				if pid.Assigner.Equal(oidTCGEKPermIDSHA256) {
					out.ekPermIDs = append(out.ekPermIDs, pid.Value)
				}
			case typ.Equal(oidHardwareModuleName):
				var hw hwModule
				if r, err := asn1.Unmarshal(val.content, &hw); err != nil || len(r) != 0 {
					return out, certErr("subjectAltName: bad HardwareModuleName")
				}
				out.hwModules = append(out.hwModules, hw)
			}
		case 0xa4: // directoryName [4] EXPLICIT Name
			var rdn pkix.RDNSequence
			if r, err := asn1.Unmarshal(gn.content, &rdn); err != nil || len(r) != 0 {
				return out, certErr("subjectAltName: bad directoryName")
			}
			for _, set := range rdn {
				for _, atv := range set {
					if name, ok := tpmAttrNames[atv.Type.String()]; ok {
						if s, ok := atv.Value.(string); ok {
							out.tpm[name] = s
						}
					}
				}
			}
		}
	}
	return out, nil
}

// checkAKCertUsage refuses a certificate whose usage does not fit a
// restricted signing key: a CA certificate, a keyUsage without
// digitalSignature or with an encryption, key agreement or certificate
// signing bit, or an extendedKeyUsage with neither a TCG purpose (OID arc
// 2.23.133, e.g. tcg-kp-AIKCertificate; GCE marks its AK certificates with
// tcg-kp-EKCertificate) nor anyExtendedKeyUsage.
func checkAKCertUsage(c *Cert) error {
	var bad []string
	if c.HasBasicCons && c.IsCA {
		bad = append(bad, "basicConstraints cA is true")
	}
	switch {
	case !c.HasKeyUsage:
		bad = append(bad, "no keyUsage extension")
	case c.KeyUsage&x509.KeyUsageDigitalSignature == 0:
		bad = append(bad, "keyUsage lacks digitalSignature")
	}
	if c.HasKeyUsage && c.KeyUsage&forbiddenAKCertKeyUsage != 0 {
		bad = append(bad, fmt.Sprintf("keyUsage has %s (not a signing-only key)", keyUsageNames(c.KeyUsage&forbiddenAKCertKeyUsage)))
	}
	if c.ExtKeyUsage != nil {
		ok := false
		for _, e := range c.ExtKeyUsage {
			ok = ok || e.Equal(oidAnyExtKeyUsage) || (len(e) > len(oidTCGArc) && e[:len(oidTCGArc)].Equal(oidTCGArc))
		}
		if !ok {
			bad = append(bad, fmt.Sprintf("extendedKeyUsage %v has no TCG purpose (e.g. tcg-kp-AIKCertificate %s)", c.ExtKeyUsage, oidTCGKPAIKCertificate))
		}
	}
	if len(bad) > 0 {
		return refuse(RuleAKCertUsage, "AK certificate %s: %s", c.Label(), strings.Join(bad, ", "))
	}
	return nil
}

func keyUsageNames(u x509.KeyUsage) string {
	names := []string{"digitalSignature", "contentCommitment", "keyEncipherment", "dataEncipherment", "keyAgreement", "keyCertSign", "cRLSign", "encipherOnly", "decipherOnly"}
	var out []string
	for i, n := range names {
		if u&(1<<i) != 0 {
			out = append(out, n)
		}
	}
	return strings.Join(out, "+")
}

// ekPermIDCandidates are the hex SHA-256 digests an EK permanent
// identifier may carry for ek: over the EK's TPMT_PUBLIC, its DER
// SubjectPublicKeyInfo, or the raw key (RSA modulus; ECC X||Y). All three
// name the same key; vtpmm accepts any of them (docs: AK certificates).
func ekPermIDCandidates(ek *Public) []string {
	var out []string
	add := func(b []byte) {
		d := sha256.Sum256(b)
		out = append(out, hex.EncodeToString(d[:]))
	}
	add(ek.Raw)
	if k, err := ek.CryptoKey(); err == nil {
		if spki, err := x509.MarshalPKIXPublicKey(k); err == nil {
			add(spki)
		}
		switch k := k.(type) {
		case *rsa.PublicKey:
			add(k.N.Bytes())
		case *ecdsa.PublicKey:
			if u, err := ek.Pub.Unique.ECC(); err == nil {
				add(append(append([]byte(nil), u.X.Buffer...), u.Y.Buffer...))
			}
		}
	}
	return out
}

// akBinding checks what the AK certificate says about the TPM against the
// EK of the evidence. It returns a description of what was checked, and
// whether the certificate names the EK itself.
func akBinding(akCert *Cert, ek *Public, ekCert *Cert) (string, bool, error) {
	san, err := parseTPMSAN(akCert.RawSAN)
	if err != nil {
		return "", false, refuse(RuleAKCertBinding, "AK certificate: %v", err)
	}
	var checked []string
	named := false
	if len(san.ekPermIDs) > 0 {
		cands := ekPermIDCandidates(ek)
		for _, id := range san.ekPermIDs {
			ok := false
			for _, c := range cands {
				ok = ok || strings.EqualFold(strings.TrimSpace(id), c)
			}
			if !ok {
				return "", false, refuse(RuleAKCertBinding, "the AK certificate names EK %s, the evidence's EK is %s", shortHex(id), short(ek.Digest()))
			}
		}
		named = true
		checked = append(checked, fmt.Sprintf("names EK %s (TCG EK permanent identifier)", short(ek.Digest())))
	}
	if len(san.tpm) > 0 && ekCert != nil {
		ekSAN, err := parseTPMSAN(ekCert.RawSAN)
		if err == nil && len(ekSAN.tpm) > 0 {
			for _, k := range []string{"manufacturer", "model", "version"} {
				a, aok := san.tpm[k]
				e, eok := ekSAN.tpm[k]
				if aok && eok && a != e {
					return "", false, refuse(RuleAKCertBinding, "the AK certificate names TPM %s %q, the EK certificate %q", k, a, e)
				}
			}
			checked = append(checked, fmt.Sprintf("TPM %s %s %s as in the EK certificate", san.tpm["manufacturer"], san.tpm["model"], san.tpm["version"]))
		}
	}
	for _, hw := range san.hwModules {
		checked = append(checked, fmt.Sprintf("hardware module %v serial %q recorded, not compared", hw.Type, hw.Serial))
	}
	return strings.Join(checked, "; "), named, nil
}

func shortHex(s string) string {
	if b, err := hex.DecodeString(strings.TrimSpace(s)); err == nil {
		return short(b)
	}
	if len(s) > 12 {
		return s[:12] + ".."
	}
	return s
}

// akCertCheck is a verified AK certificate, as cached.
type akCertCheck struct {
	path    *pathCheck
	binding string
	named   bool
}

// verifyAKCert checks an AK certificate against the AK roots, the AK and
// the EK. ekCert may be nil.
func (v *Verifier) verifyAKCert(ak, ek *Public, ekCert *Cert, certDER []byte, intermediates [][]byte, now time.Time) (*akCertCheck, error) {
	pol := v.Policy.AKCert
	certs, err := ParseCertificates(certDER)
	if err != nil {
		return nil, refuse(RuleAKCertChain, "AK certificate: %v", err)
	}
	leaf := certs[0]
	inter, err := parseIntermediates(intermediates, RuleAKCertChain, "AK")
	if err != nil {
		return nil, err
	}
	var gen uint64
	if v.AKRoots != nil {
		gen = v.AKRoots.generation()
	}
	chain, err := v.AKRoots.verifyPath(leaf, inter, pathOptions{
		what: "AK certificate", allowSHA1: false, checkValidity: !pol.SkipValidity,
		sha1Refusal: "refused: SHA-1 is accepted on EK certificate paths only",
		rules:       pathRules{chain: RuleAKCertChain, signature: RuleAKCertSignature, validity: RuleAKCertValidity},
	}, now)
	if err != nil {
		return nil, err
	}
	key, err := ak.CryptoKey()
	if err != nil {
		return nil, refuse(RuleAKCertKey, "AK public area: %v", err)
	}
	if leaf.PublicKey == nil || !sameKey(key, leaf.PublicKey) {
		return nil, refuse(RuleAKCertKey, "the AK certificate %s certifies another key than the AK %s", leaf.Label(), short(ak.Digest()))
	}
	if err := checkAKCertUsage(leaf); err != nil {
		return nil, err
	}
	binding, named, err := akBinding(leaf, ek, ekCert)
	if err != nil {
		return nil, err
	}
	if pol.RequireEKBinding && !named {
		return nil, refuse(RuleAKCertBinding, "policy ak_certificate.require_ek_binding: the AK certificate does not name the EK (no TCG EK permanent identifier)")
	}
	return &akCertCheck{path: newPathCheck(v.AKRoots, gen, leaf, chain), binding: binding, named: named}, nil
}

// akCert verifies the AK certificate of the evidence (cached) and records
// the ak-cert-* steps.
func (r *run) akCert(ak, ek *Public, ekCert *Cert, certDER []byte, intermediates [][]byte) error {
	v, pol := r.v, r.v.Policy.AKCert
	if len(certDER) == 0 {
		return refuse(RuleAKCertChain, "the host was enrolled on an AK certificate but presents none")
	}
	var ekCertRaw []byte
	if ekCert != nil {
		ekCertRaw = ekCert.Raw
	}
	parts := append([][]byte{certDER, ak.Raw, ek.Raw, ekCertRaw, {boolByte(pol.RequireEKBinding), boolByte(pol.SkipValidity)}}, intermediates...)
	k := keyOf("ak-cert", parts...)
	c, ok := r.c.akChecks.get(k)
	if !ok || !c.path.usable(v.AKRoots, !pol.SkipValidity, r.now) {
		var err error
		if c, err = v.verifyAKCert(ak, ek, ekCert, certDER, intermediates, r.now); err != nil {
			return err
		}
		r.c.akChecks.put(k, c, 1)
	}
	chain := c.path.chain
	r.res.AKChain = chain
	r.pass(RuleAKCertChain, "AK certificate %s chains to AK root %q", chain[0].Cert.Label(), chain[len(chain)-1].Cert.Label())
	r.pass(RuleAKCertSignature, "%d signature(s) verified on the path (SHA-1 not accepted)", len(chain)-1)
	if pol.SkipValidity {
		r.skip(RuleAKCertValidity, "policy ak_certificate.skip_validity is true")
	} else {
		r.pass(RuleAKCertValidity, "every certificate valid at %s", r.now.UTC().Format(time.RFC3339))
	}
	r.pass(RuleAKCertKey, "certifies the AK %s", short(r.res.AKName))
	r.pass(RuleAKCertUsage, "restricted-signing usage (digitalSignature, not a CA)")
	switch {
	case c.named:
		r.pass(RuleAKCertBinding, "%s", c.binding)
	case c.binding != "":
		r.warn(RuleAKCertBinding, "the certificate does not name the EK (checked: %s); the AK CA vouches for the AK, not for its TPM's EK", c.binding)
	default:
		r.warn(RuleAKCertBinding, "the certificate names neither the EK nor the TPM; the AK CA vouches for the AK, not for its TPM's EK")
	}
	return nil
}

// akCertDigest identifies an AK certificate in an enrolment record.
func akCertDigest(der []byte) []byte {
	d := sha256.Sum256(der)
	return d[:]
}
