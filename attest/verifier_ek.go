package attest

import (
	"context"
	"fmt"
	"time"
)

// pathCheck is a verified certificate path, as cached: the parsed leaf, the
// chain, and the validity window of the whole path. It is valid only for
// the store generation it was verified against.
type pathCheck struct {
	store *RootStore
	gen   uint64
	leaf  *Cert
	chain Chain
	// from..until is the intersection of the validity periods on the path
	// (zero when a date did not parse).
	from, until time.Time
}

// usable reports whether a cached path still applies: same store and
// generation, and inside its validity window when validity is checked.
func (p *pathCheck) usable(store *RootStore, checkValidity bool, now time.Time) bool {
	if p.store != store || p.gen != store.generation() {
		return false
	}
	if checkValidity && (p.from.IsZero() || p.until.IsZero() || now.Before(p.from) || now.After(p.until)) {
		return false
	}
	return true
}

func newPathCheck(store *RootStore, gen uint64, leaf *Cert, chain Chain) *pathCheck {
	p := &pathCheck{store: store, gen: gen, leaf: leaf, chain: chain}
	for i, l := range chain {
		nb, na := l.Cert.NotBefore, l.Cert.NotAfter
		if nb.IsZero() || na.IsZero() {
			p.from, p.until = time.Time{}, time.Time{}
			break
		}
		if i == 0 || nb.After(p.from) {
			p.from = nb
		}
		if i == 0 || na.Before(p.until) {
			p.until = na
		}
	}
	return p
}

func boolByte(b bool) byte {
	if b {
		return 1
	}
	return 0
}

// pathKey is the cache key of a path: the leaf, the intermediates, the
// key the leaf must certify and the policy knobs, all as exact bytes.
func pathKey(domain string, leaf []byte, intermediates [][]byte, keyRaw []byte, knobs ...bool) cacheKey {
	parts := make([][]byte, 0, len(intermediates)+3)
	parts = append(parts, leaf, keyRaw)
	k := make([]byte, len(knobs))
	for i, b := range knobs {
		k[i] = boolByte(b)
	}
	parts = append(parts, k)
	parts = append(parts, intermediates...)
	return keyOf(domain, parts...)
}

// checkEK verifies the EK certificate chain (or records that the host
// relies on an enrolled EK) and returns the parsed EK certificate (nil
// without one).
func (r *run) checkEK(ek *Public, ekCert []byte, intermediates [][]byte) (*Cert, error) {
	v, pol := r.v, r.v.Policy.EK
	if len(ekCert) == 0 {
		// No certificate: the EK must have been enrolled by the operator
		// (activation records are keyed by EK digest and checked below).
		r.skip(RuleEKChain, "no EK certificate: relying on the enrolled EK %s", short(ek.Digest()))
		return nil, nil
	}
	k := pathKey("ek-path", ekCert, intermediates, ek.Raw, pol.Strict, pol.CheckValidity)
	p, ok := r.c.ekPaths.get(k)
	if !ok || !p.usable(v.Roots, pol.CheckValidity, r.now) {
		var err error
		if p, err = verifyEKPath(v.Roots, ek, ekCert, intermediates, pol, r.now); err != nil {
			return nil, err
		}
		r.c.ekPaths.put(k, p, 1)
	}
	r.res.EKChain = p.chain
	r.pass(RuleEKChain, "EK certificate chains to trust anchor %q", p.chain[len(p.chain)-1].Cert.Label())
	if w := p.chain.sha1Warning(); w != "" {
		r.warn(RuleEKSignature, "%d signature(s) verified on the path; %s", len(p.chain)-1, w)
	} else {
		r.pass(RuleEKSignature, "%d signature(s) verified on the path", len(p.chain)-1)
	}
	if pol.CheckValidity {
		r.pass(RuleEKValidity, "every certificate valid at %s", r.now.UTC().Format(time.RFC3339))
	} else {
		r.skip(RuleEKValidity, "policy ek.check_validity is false")
	}
	r.pass(RuleEKPublic, "EK public area %s is the certified key", short(ek.Digest()))
	return p.leaf, nil
}

// verifyEKPath parses the EK certificate and intermediates, verifies the
// path and that the certificate certifies ek.
func verifyEKPath(roots *RootStore, ek *Public, ekCert []byte, intermediates [][]byte, pol CertPolicy, now time.Time) (*pathCheck, error) {
	certs, err := ParseCertificates(ekCert)
	if err != nil {
		return nil, refuse(RuleEKChain, "EK certificate: %v", err)
	}
	inter, err := parseIntermediates(intermediates, RuleEKChain, "EK")
	if err != nil {
		return nil, err
	}
	var gen uint64
	if roots != nil {
		gen = roots.generation()
	}
	chain, err := roots.VerifyEK(certs[0], inter, pol, now)
	if err != nil {
		return nil, err
	}
	key, err := ek.CryptoKey()
	if err != nil {
		return nil, refuse(RuleEKPublic, "EK public area: %v", err)
	}
	if certs[0].PublicKey == nil || !sameKey(key, certs[0].PublicKey) {
		return nil, refuse(RuleEKPublic, "the EK certificate certifies another key than the EK public area %s", short(ek.Digest()))
	}
	return newPathCheck(roots, gen, certs[0], chain), nil
}

func parseIntermediates(ders [][]byte, rule Rule, what string) ([]*Cert, error) {
	var out []*Cert
	for i, d := range ders {
		c, err := ParseCertificate(d)
		if err != nil {
			return nil, refuse(rule, "%s intermediate %d: %v", what, i, err)
		}
		out = append(out, c)
	}
	return out, nil
}

// CheckEK verifies a host's EK certificate (DER, with optional untrusted
// intermediates) against the roots and the policy, and that it certifies
// ekPub (TPMT_PUBLIC). Enrolment runs it before challenging an AK, so only
// a genuine TPM's AK is ever enrolled.
func (v *Verifier) CheckEK(ctx context.Context, host string, ekCert []byte, intermediates [][]byte, ekPub []byte) (Chain, error) {
	if v.Policy == nil || v.Clock == nil || v.Roots == nil {
		return nil, fmt.Errorf("attest: CheckEK needs Policy, Clock and Roots")
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ek, err := ParsePublic("EK", ekPub)
	if err != nil {
		return nil, withHost(err, host)
	}
	if len(ekCert) == 0 {
		return nil, withHost(refuse(RuleEKChain, "the host presents no EK certificate: enrol its EK out of band"), host)
	}
	r := &run{v: v, c: v.caches(), ctx: ctx, res: &Result{Host: host}, now: v.Clock()}
	if _, err := r.checkEK(ek, ekCert, intermediates); err != nil {
		return nil, withHost(err, host)
	}
	return r.res.EKChain, nil
}
