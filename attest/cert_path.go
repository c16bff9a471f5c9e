package attest

import (
	"bytes"
	"crypto"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"
)

// pathRules names the rules a certificate path refusal is reported under:
// ek-chain/ek-signature/ek-validity for EK certificates, the ak-cert-*
// rules for AK certificates.
type pathRules struct {
	chain, signature, validity Rule
}

// pathOptions configures one path verification.
type pathOptions struct {
	what          string // "EK certificate", "AK certificate"
	allowSHA1     bool   // accept SHA-1 signatures (EK chains unless strict)
	sha1Refusal   string // why SHA-1 is refused, for the message
	checkValidity bool
	rules         pathRules
}

// errSHA1Refused marks a refusal of a SHA-1 signature by policy (as opposed
// to a signature that does not verify): the walker reports it as is rather
// than trying other issuers.
var errSHA1Refused = errors.New("SHA-1 signature refused")

// ChainLink is one certificate of a verified path.
type ChainLink struct {
	Cert   *Cert
	Anchor bool   // true for the trust anchor that ends the path
	Source string // file the anchor came from, if known
	// SHA1 is true when this certificate's signature was verified with
	// SHA-1 (accepted on EK paths unless ek.strict).
	SHA1 bool
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

// SHA1Depths lists the depths (0 = leaf) of the certificates whose
// signature was verified with SHA-1.
func (c Chain) SHA1Depths() []int {
	var out []int
	for i, l := range c {
		if l.SHA1 {
			out = append(out, i)
		}
	}
	return out
}

// sha1Warning describes the SHA-1 signatures of an accepted EK path ("" if
// none).
func (c Chain) sha1Warning() string {
	d := c.SHA1Depths()
	if len(d) == 0 {
		return ""
	}
	var parts []string
	for _, i := range d {
		issuer := "its issuer"
		if i+1 < len(c) {
			issuer = fmt.Sprintf("%q", c[i+1].Cert.Label())
		}
		parts = append(parts, fmt.Sprintf("depth %d (%s by %s)", i, sigAlgName(c[i].Cert.SigAlg), issuer))
	}
	return fmt.Sprintf("SHA-1 signature(s) accepted on the EK path at %s; a factory CA does not sign attacker-chosen certificates, set ek.strict: true to refuse them",
		strings.Join(parts, ", "))
}

// verifyPath builds a path from leaf to a trust anchor of s, through
// optional untrusted intermediates, checking every signature on the path.
// Issuers are matched by name (and by AKI/SKI when both are present); among
// candidates the first whose key verifies the signature wins.
func (s *RootStore) verifyPath(leaf *Cert, intermediates []*Cert, o pathOptions, now time.Time) (Chain, error) {
	if s == nil || s.Len() == 0 {
		return nil, refuse(o.rules.chain, "no trust anchors configured")
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	chain := Chain{{Cert: leaf}}
	cur := leaf
	for depth := 1; depth <= maxChainDepth; depth++ {
		if o.checkValidity {
			if err := checkValidity(cur, depth-1, now, o.rules.validity); err != nil {
				return nil, err
			}
		}
		if i := s.indexOfLocked(cur); i >= 0 {
			chain[len(chain)-1].Anchor = true
			chain[len(chain)-1].Source = s.files[i]
			return chain, nil
		}
		var sigErr error
		next, anchor, src, usedSHA1, err := s.findIssuerLocked(cur, intermediates, o, depth, &sigErr)
		if err != nil {
			return nil, err
		}
		if next == nil {
			if sigErr != nil {
				return nil, sigErr
			}
			return nil, refuse(o.rules.chain, "%s does not chain to a trusted root (issuer %q of the certificate at depth %d is not in the store)", o.what, cur.Issuer(), depth-1)
		}
		chain[len(chain)-1].SHA1 = usedSHA1
		if !anchor && depth > 1 && cur.HasBasicCons && !cur.IsCA {
			return nil, refuse(o.rules.chain, "certificate at depth %d (%s) is not a CA", depth-1, cur.Label())
		}
		if anchor {
			if o.checkValidity {
				if err := checkValidity(next, depth, now, o.rules.validity); err != nil {
					return nil, err
				}
			}
			chain = append(chain, ChainLink{Cert: next, Anchor: true, Source: src})
			return chain, nil
		}
		if next.HasBasicCons && !next.IsCA {
			return nil, refuse(o.rules.chain, "issuer at depth %d (%s) is not a CA", depth, next.Label())
		}
		chain = append(chain, ChainLink{Cert: next})
		cur = next
	}
	return nil, refuse(o.rules.chain, "%s path longer than %d", o.what, maxChainDepth)
}

// findIssuerLocked looks for the issuer of child among anchors first, then
// among intermediates. A name match whose signature fails is remembered in
// sigErr; a SHA-1 signature refused by policy is returned as the error.
func (s *RootStore) findIssuerLocked(child *Cert, intermediates []*Cert, o pathOptions, depth int, sigErr *error) (next *Cert, anchor bool, src string, usedSHA1 bool, err error) {
	try := func(cand *Cert) (bool, bool, error) {
		if !sameName(cand.RawSubject, child.RawIssuer) {
			return false, false, nil
		}
		if len(child.AuthorityKey) > 0 && len(cand.SubjectKeyID) > 0 && !bytes.Equal(child.AuthorityKey, cand.SubjectKeyID) {
			return false, false, nil
		}
		sha1, err := checkCertSignature(child, cand, o)
		if err != nil {
			if errors.Is(err, errSHA1Refused) {
				return false, false, withDepth(err, depth-1) // policy refusal: report it as is
			}
			if *sigErr == nil {
				*sigErr = refuse(o.rules.signature, "bad signature at depth %d: %s (issuer %q)", depth-1, err, child.Issuer())
			}
			return false, false, nil
		}
		return true, sha1, nil
	}
	for i, a := range s.certs {
		ok, sha1, err := try(a)
		if err != nil {
			return nil, false, "", false, err
		}
		if ok {
			return a, true, s.files[i], sha1, nil
		}
	}
	for _, c := range intermediates {
		if bytes.Equal(c.Raw, child.Raw) {
			continue
		}
		ok, sha1, err := try(c)
		if err != nil {
			return nil, false, "", false, err
		}
		if ok {
			return c, false, "", sha1, nil
		}
	}
	return nil, false, "", false, nil
}

func withDepth(err error, depth int) error {
	var re *RefusalError
	if errors.As(err, &re) {
		re.Detail = fmt.Sprintf("at depth %d: %s", depth, re.Detail)
	}
	return err
}

func checkValidity(c *Cert, depth int, now time.Time, rule Rule) error {
	if c.NotBefore.IsZero() || c.NotAfter.IsZero() {
		return refuse(rule, "certificate at depth %d (%s) has an unparseable validity", depth, c.Label())
	}
	if now.Before(c.NotBefore) || now.After(c.NotAfter) {
		return refuse(rule, "certificate at depth %d (%s) valid %s..%s, not at %s", depth, c.Label(),
			c.NotBefore.Format(time.DateOnly), c.NotAfter.Format(time.DateOnly), now.UTC().Format(time.DateOnly))
	}
	return nil
}

// checkCertSignature verifies child's signature with parent's public key
// and reports whether it used SHA-1. A SHA-1 signature the options do not
// allow is a refusal that unwraps to errSHA1Refused.
func checkCertSignature(child, parent *Cert, o pathOptions) (bool, error) {
	h, kind, err := sigAlgHash(child.SigAlg, child.SigParams)
	if err != nil {
		return false, err
	}
	if h == crypto.SHA1 && !o.allowSHA1 {
		re := refuse(o.rules.signature, "SHA-1 signature (%s) by %q %s", sigAlgName(child.SigAlg), parent.Label(), o.sha1Refusal)
		re.Cause = errSHA1Refused
		return false, re
	}
	if parent.PublicKey == nil {
		return false, fmt.Errorf("issuer key algorithm %v unsupported", parent.PublicKeyAlg)
	}
	return h == crypto.SHA1, verifySig(parent.PublicKey, h, kind, child.RawTBS, child.Signature)
}
