package attest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/asn1"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	// Register the hashes used by certificate signatures.
	_ "crypto/sha1"
	_ "crypto/sha256"
	_ "crypto/sha512"
)

// CertPolicy is the EK certificate chain policy.
type CertPolicy struct {
	// Strict refuses SHA-1 signatures on the EK path. Default false: a
	// SHA-1 signature on an EK chain is accepted (with a warning in the
	// explanation), because STMicro ST33, Nuvoton NPCT6xx and Infineon
	// TPM 1.2-era EK chains are signed with sha1WithRSA and a collision
	// attack needs the factory CA to sign an attacker-chosen certificate.
	// SHA-1 is refused everywhere else (quotes, certifications, AK
	// certificate paths) whatever this says.
	Strict bool `json:"strict" yaml:"strict"`
	// AllowSHA1 is deprecated and has no effect: SHA-1-signed EK chains are
	// accepted by default and Strict refuses them. It is kept so that
	// existing policy files still load; Policy.Deprecations names it.
	AllowSHA1 *bool `json:"allow_sha1,omitempty" yaml:"allow_sha1,omitempty"`
	// CheckValidity enforces notBefore/notAfter of every certificate on the
	// path at verification time. Default false: an EK certificate names a
	// key burnt into the chip for the chip's life, and real EK certificates
	// expire while the TPM is in service (STM and IFX samples expired in
	// 2023/2024) or have notBefore earlier than their issuer's.
	CheckValidity bool `json:"check_validity" yaml:"check_validity"`
}

// ekPath is how EK chains are verified under pol.
func (pol CertPolicy) ekPath() pathOptions {
	return pathOptions{
		what: "EK certificate", allowSHA1: !pol.Strict, checkValidity: pol.CheckValidity,
		sha1Refusal: "refused by policy (ek.strict: true)",
		rules:       pathRules{chain: RuleEKChain, signature: RuleEKSignature, validity: RuleEKValidity},
	}
}

// maxChainDepth bounds path building.
const maxChainDepth = 8

// RootStore holds trust anchors. Every certificate in the store is an
// anchor, whether self-signed or not: manufacturer trust stores (keylime's
// tpm_cert_store) mix roots and intermediates, some of whose issuers are
// absent. A path ends at the first store certificate that verifies it. A
// RootStore is safe for concurrent use; Add bumps its generation, which
// invalidates every cached path verified against it.
type RootStore struct {
	mu    sync.RWMutex
	certs []*Cert
	files []string // source file per cert, for messages
	index map[[32]byte]int
	gen   uint64
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
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.index == nil {
		s.index = map[[32]byte]int{}
	}
	d := sha256.Sum256(c.Raw)
	if _, dup := s.index[d]; dup {
		return
	}
	s.index[d] = len(s.certs)
	s.certs = append(s.certs, c)
	s.files = append(s.files, source)
	s.gen++
}

// Len returns the number of anchors.
func (s *RootStore) Len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.certs)
}

// generation changes whenever an anchor is added.
func (s *RootStore) generation() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.gen
}

func (s *RootStore) indexOfLocked(c *Cert) int {
	if i, ok := s.index[sha256.Sum256(c.Raw)]; ok {
		return i
	}
	return -1
}

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

// VerifyEK builds a path from leaf to a trust anchor, through optional
// untrusted intermediates, checking every signature on the path. Issuers are
// matched by name (and by AKI/SKI when both are present); among candidates
// the first whose key verifies the signature wins. SHA-1 signatures are
// accepted unless pol.Strict (Chain.SHA1Depths lists them). Refusals are
// *RefusalError with rule ek-chain, ek-signature or ek-validity.
func (s *RootStore) VerifyEK(leaf *Cert, intermediates []*Cert, pol CertPolicy, now time.Time) (Chain, error) {
	return s.verifyPath(leaf, intermediates, pol.ekPath(), now)
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
