package attest

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"encoding/asn1"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	// Register the hashes used by certificate signatures.
	_ "crypto/sha1"
	_ "crypto/sha256"
	_ "crypto/sha512"
)

// CertPolicy is the EK certificate chain policy.
type CertPolicy struct {
	// AllowSHA1 accepts SHA-1 signatures on the path. Default false: only
	// TPM 1.2-era chains (Infineon, STMicro ST33ZP24) need it.
	AllowSHA1 bool `json:"allow_sha1" yaml:"allow_sha1"`
	// CheckValidity enforces notBefore/notAfter of every certificate on the
	// path at verification time. Default false: an EK certificate names a
	// key burnt into the chip for the chip's life, and real EK certificates
	// expire while the TPM is in service (STM and IFX samples expired in
	// 2023/2024) or have notBefore earlier than their issuer's.
	CheckValidity bool `json:"check_validity" yaml:"check_validity"`
}

// maxChainDepth bounds path building.
const maxChainDepth = 8

// RootStore holds trust anchors. Every certificate in the store is an
// anchor, whether self-signed or not: manufacturer trust stores (keylime's
// tpm_cert_store) mix roots and intermediates, some of whose issuers are
// absent. A path ends at the first store certificate that verifies it.
type RootStore struct {
	certs []*Cert
	files []string // source file per cert, for messages
}

// NewRootStore returns a store holding certs.
func NewRootStore(certs ...*Cert) *RootStore {
	s := &RootStore{}
	for _, c := range certs {
		s.Add(c, "")
	}
	return s
}

// Add adds one anchor (duplicates are ignored).
func (s *RootStore) Add(c *Cert, source string) {
	for _, have := range s.certs {
		if bytes.Equal(have.Raw, c.Raw) {
			return
		}
	}
	s.certs = append(s.certs, c)
	s.files = append(s.files, source)
}

// Len returns the number of anchors.
func (s *RootStore) Len() int { return len(s.certs) }

// LoadRootStore loads every .crt .cer .pem .der file of each directory
// (not recursive). A file may hold several PEM blocks, text around them,
// plain DER or DER with the TCG NV header. Any unparseable file is an error.
// Certificates whose basicConstraints say cA=false are skipped, so a
// directory that also holds leaf certificates does not trust them.
func LoadRootStore(dirs ...string) (*RootStore, error) {
	s := &RootStore{}
	for _, dir := range dirs {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return nil, fmt.Errorf("root store: %w", err)
		}
		sort.Slice(entries, func(i, j int) bool { return entries[i].Name() < entries[j].Name() })
		for _, e := range entries {
			ext := strings.ToLower(filepath.Ext(e.Name()))
			if e.IsDir() || (ext != ".crt" && ext != ".cer" && ext != ".pem" && ext != ".der") {
				continue
			}
			p := filepath.Join(dir, e.Name())
			data, err := os.ReadFile(p)
			if err != nil {
				return nil, fmt.Errorf("root store: %w", err)
			}
			certs, err := ParseCertificates(data)
			if err != nil {
				return nil, fmt.Errorf("root store: %s: %w", p, err)
			}
			for _, c := range certs {
				if c.HasBasicCons && !c.IsCA {
					continue // an end-entity certificate is never an anchor
				}
				s.Add(c, p)
			}
		}
	}
	return s, nil
}

// ChainLink is one certificate of a verified path.
type ChainLink struct {
	Cert   *Cert
	Anchor bool   // true for the trust anchor that ends the path
	Source string // file the anchor came from, if known
}

// Chain is a verified path, leaf first.
type Chain []ChainLink

func (c Chain) String() string {
	var b strings.Builder
	for i, l := range c {
		fmt.Fprintf(&b, "%d: %s", i, l.Cert.Label())
		if l.Anchor {
			b.WriteString(" [trust anchor")
			if l.Source != "" {
				fmt.Fprintf(&b, " %s", filepath.Base(l.Source))
			}
			b.WriteString("]")
		}
		fmt.Fprintf(&b, " (%s)\n", sigAlgName(l.Cert.SigAlg))
	}
	return b.String()
}

// VerifyEK builds a path from leaf to a trust anchor, through optional
// untrusted intermediates, checking every signature on the path. Issuers are
// matched by name (and by AKI/SKI when both are present); among candidates
// the first whose key verifies the signature wins. Refusals are
// *RefusalError with rule ek-chain, ek-signature or ek-validity.
func (s *RootStore) VerifyEK(leaf *Cert, intermediates []*Cert, pol CertPolicy, now time.Time) (Chain, error) {
	if s == nil || len(s.certs) == 0 {
		return nil, refuse(RuleEKChain, "no trust anchors configured")
	}
	chain := Chain{{Cert: leaf}}
	cur := leaf
	for depth := 1; depth <= maxChainDepth; depth++ {
		if pol.CheckValidity {
			if err := checkValidity(cur, depth-1, now); err != nil {
				return nil, err
			}
		}
		if i := s.indexOf(cur); i >= 0 {
			chain[len(chain)-1].Anchor = true
			chain[len(chain)-1].Source = s.files[i]
			return chain, nil
		}
		var sigErr error
		next, anchor, src, err := s.findIssuer(cur, intermediates, pol, depth, &sigErr)
		if err != nil {
			return nil, err
		}
		if next == nil {
			if sigErr != nil {
				return nil, sigErr
			}
			return nil, refuse(RuleEKChain, "EK certificate does not chain to a trusted root (issuer %q of the certificate at depth %d is not in the store)", cur.Issuer(), depth-1)
		}
		if !anchor && depth > 1 && cur.HasBasicCons && !cur.IsCA {
			return nil, refuse(RuleEKChain, "certificate at depth %d (%s) is not a CA", depth-1, cur.Label())
		}
		if anchor {
			if pol.CheckValidity {
				if err := checkValidity(next, depth, now); err != nil {
					return nil, err
				}
			}
			chain = append(chain, ChainLink{Cert: next, Anchor: true, Source: src})
			return chain, nil
		}
		if next.HasBasicCons && !next.IsCA {
			return nil, refuse(RuleEKChain, "issuer at depth %d (%s) is not a CA", depth, next.Label())
		}
		chain = append(chain, ChainLink{Cert: next})
		cur = next
	}
	return nil, refuse(RuleEKChain, "EK certificate path longer than %d", maxChainDepth)
}

func (s *RootStore) indexOf(c *Cert) int {
	for i, a := range s.certs {
		if bytes.Equal(a.Raw, c.Raw) {
			return i
		}
	}
	return -1
}

// findIssuer looks for the issuer of child among anchors first, then among
// intermediates. A name match whose signature fails is remembered in sigErr.
func (s *RootStore) findIssuer(child *Cert, intermediates []*Cert, pol CertPolicy, depth int, sigErr *error) (*Cert, bool, string, error) {
	try := func(cand *Cert) (bool, error) {
		if !sameName(cand.RawSubject, child.RawIssuer) {
			return false, nil
		}
		if len(child.AuthorityKey) > 0 && len(cand.SubjectKeyID) > 0 && !bytes.Equal(child.AuthorityKey, cand.SubjectKeyID) {
			return false, nil
		}
		if err := checkCertSignature(child, cand, pol); err != nil {
			var re *RefusalError
			if errors.As(err, &re) && re.Rule == RuleEKSignature && strings.Contains(re.Detail, "SHA-1") {
				return false, err // policy refusal: report it as is
			}
			if *sigErr == nil {
				*sigErr = refuse(RuleEKSignature, "bad signature at depth %d: %s (issuer %q)", depth-1, err, child.Issuer())
			}
			return false, nil
		}
		return true, nil
	}
	for i, a := range s.certs {
		ok, err := try(a)
		if err != nil {
			return nil, false, "", withDepth(err, depth-1)
		}
		if ok {
			return a, true, s.files[i], nil
		}
	}
	for _, c := range intermediates {
		if bytes.Equal(c.Raw, child.Raw) {
			continue
		}
		ok, err := try(c)
		if err != nil {
			return nil, false, "", withDepth(err, depth-1)
		}
		if ok {
			return c, false, "", nil
		}
	}
	return nil, false, "", nil
}

func withDepth(err error, depth int) error {
	var re *RefusalError
	if errors.As(err, &re) {
		re.Detail = fmt.Sprintf("at depth %d: %s", depth, re.Detail)
	}
	return err
}

func checkValidity(c *Cert, depth int, now time.Time) error {
	if c.NotBefore.IsZero() || c.NotAfter.IsZero() {
		return refuse(RuleEKValidity, "certificate at depth %d (%s) has an unparseable validity", depth, c.Label())
	}
	if now.Before(c.NotBefore) || now.After(c.NotAfter) {
		return refuse(RuleEKValidity, "certificate at depth %d (%s) valid %s..%s, not at %s", depth, c.Label(),
			c.NotBefore.Format(time.DateOnly), c.NotAfter.Format(time.DateOnly), now.UTC().Format(time.DateOnly))
	}
	return nil
}

// checkCertSignature verifies child's signature with parent's public key.
func checkCertSignature(child, parent *Cert, pol CertPolicy) error {
	h, kind, err := sigAlgHash(child.SigAlg, child.SigParams)
	if err != nil {
		return err
	}
	if h == crypto.SHA1 && !pol.AllowSHA1 {
		return refuse(RuleEKSignature, "SHA-1 signature (%s) by %q refused by policy (allow_sha1: false)", sigAlgName(child.SigAlg), parent.Label())
	}
	if parent.PublicKey == nil {
		return fmt.Errorf("issuer key algorithm %v unsupported", parent.PublicKeyAlg)
	}
	return verifySig(parent.PublicKey, h, kind, child.RawTBS, child.Signature)
}

type sigKind int

const (
	sigRSAPKCS1 sigKind = iota
	sigRSAPSS
	sigECDSA
)

// verifySig verifies an X.509-style signature (ECDSA is ASN.1 DER).
func verifySig(pub crypto.PublicKey, h crypto.Hash, kind sigKind, msg, sig []byte) error {
	hh := h.New()
	hh.Write(msg)
	digest := hh.Sum(nil)
	switch k := pub.(type) {
	case *rsa.PublicKey:
		switch kind {
		case sigRSAPKCS1:
			return rsa.VerifyPKCS1v15(k, h, digest, sig)
		case sigRSAPSS:
			return rsa.VerifyPSS(k, h, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto})
		}
	case *ecdsa.PublicKey:
		if kind == sigECDSA {
			if ecdsa.VerifyASN1(k, digest, sig) {
				return nil
			}
			return errors.New("ECDSA verification failure")
		}
	}
	return fmt.Errorf("key type %T does not match the signature algorithm", pub)
}

func sigAlgHash(oid asn1.ObjectIdentifier, params []byte) (crypto.Hash, sigKind, error) {
	switch {
	case oid.Equal(oidSHA1WithRSA):
		return crypto.SHA1, sigRSAPKCS1, nil
	case oid.Equal(oidSHA256WithRSA):
		return crypto.SHA256, sigRSAPKCS1, nil
	case oid.Equal(oidSHA384WithRSA):
		return crypto.SHA384, sigRSAPKCS1, nil
	case oid.Equal(oidSHA512WithRSA):
		return crypto.SHA512, sigRSAPKCS1, nil
	case oid.Equal(oidECDSAWithSHA1):
		return crypto.SHA1, sigECDSA, nil
	case oid.Equal(oidECDSAWithS256):
		return crypto.SHA256, sigECDSA, nil
	case oid.Equal(oidECDSAWithS384):
		return crypto.SHA384, sigECDSA, nil
	case oid.Equal(oidECDSAWithS512):
		return crypto.SHA512, sigECDSA, nil
	case oid.Equal(oidRSASSAPSS):
		return pssHash(params), sigRSAPSS, nil
	}
	return 0, 0, fmt.Errorf("unsupported signature algorithm %v", oid)
}

// pssHash reads the hashAlgorithm [0] of RSASSA-PSS-params (default SHA-1).
func pssHash(params []byte) crypto.Hash {
	seq, _, err := expect(params, tagSequence)
	if err != nil {
		return crypto.SHA1
	}
	h0, _, ok, _ := optional(seq.content, 0xa0)
	if !ok {
		return crypto.SHA1
	}
	alg, _, err := expect(h0.content, tagSequence)
	if err != nil {
		return crypto.SHA1
	}
	oid, _, err := readAlgID(alg)
	if err != nil {
		return crypto.SHA1
	}
	switch {
	case oid.Equal(oidSHA256):
		return crypto.SHA256
	case oid.Equal(oidSHA384):
		return crypto.SHA384
	case oid.Equal(oidSHA512):
		return crypto.SHA512
	}
	return crypto.SHA1
}

func sigAlgName(oid asn1.ObjectIdentifier) string {
	names := map[string]string{
		oidSHA1WithRSA.String():   "sha1WithRSA",
		oidSHA256WithRSA.String(): "sha256WithRSA",
		oidSHA384WithRSA.String(): "sha384WithRSA",
		oidSHA512WithRSA.String(): "sha512WithRSA",
		oidECDSAWithSHA1.String(): "ecdsa-with-SHA1",
		oidECDSAWithS256.String(): "ecdsa-with-SHA256",
		oidECDSAWithS384.String(): "ecdsa-with-SHA384",
		oidECDSAWithS512.String(): "ecdsa-with-SHA512",
		oidRSASSAPSS.String():     "RSASSA-PSS",
	}
	if n, ok := names[oid.String()]; ok {
		return n
	}
	return oid.String()
}
