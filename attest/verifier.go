package attest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
)

// maxClockSkew is how far in the future produced_at may be.
const maxClockSkew = 2 * time.Minute

// Verifier applies the policy to evidence. Policy, Clock and Enrollments
// are required; Roots may be empty when every EK is enrolled instead, and
// AKRoots is needed only when the policy enrols hosts on AK certificates.
//
// A Verifier caches what does not change between verifications of a known
// host (see cache.go); it is safe for concurrent use. Do not modify Policy
// or the root stores' certificates in place while it is in use: replace the
// Verifier (or add anchors with RootStore.Add, which invalidates cached
// paths).
type Verifier struct {
	Roots *RootStore
	// AKRoots are the trust anchors of AK certificates: a TPM or platform
	// manufacturer's IAK CA, or an enterprise CA that certifies AKs.
	AKRoots     *RootStore
	Policy      *Policy
	Enrollments Enrollments
	// Nonces, when set, makes every nonce single-use: Verify consumes it.
	Nonces NonceConsumer
	Clock  func() time.Time
	Log    logrus.FieldLogger

	cache atomic.Pointer[verifierCache]
}

// caches returns the Verifier's caches, creating them on first use.
func (v *Verifier) caches() *verifierCache {
	if c := v.cache.Load(); c != nil {
		return c
	}
	v.cache.CompareAndSwap(nil, newVerifierCache())
	return v.cache.Load()
}

// Step outcomes. "warn" is a pass that the operator should know about (a
// SHA-1 signature accepted on an EK path, an AK certificate that does not
// name its EK).
const (
	OutcomePass = "pass"
	OutcomeWarn = "warn"
	OutcomeSkip = "skip"
	OutcomeFail = "fail"
)

// Step is one rule's outcome.
type Step struct {
	Rule    Rule   `json:"rule"`
	Outcome string `json:"outcome"` // "pass", "warn", "skip" or "fail"
	Detail  string `json:"detail"`
}

// Result is the step-by-step account of a verification. On success it
// carries what the caller needs next (the migration key to wrap for). Its
// PCRs, Facts and chains may share memory with the verifier's caches:
// treat them as read-only.
type Result struct {
	Host     string     `json:"host"`
	Steps    []Step     `json:"steps"`
	EKChain  Chain      `json:"-"`
	AKChain  Chain      `json:"-"` // the AK certificate path, when one was verified
	AKName   HexBytes   `json:"ak_name,omitempty"`
	MKName   HexBytes   `json:"mk_name,omitempty"`
	MKPublic HexBytes   `json:"mk_public,omitempty"` // TPMT_PUBLIC to wrap keys for
	PCRs     PCRValues  `json:"-"`
	Facts    *BootFacts `json:"-"`
	// Enrollment is the record EnrollByAKCertificate stored.
	Enrollment *Enrollment `json:"enrollment,omitempty"`
}

// Explain renders the steps, one line each.
func (r *Result) Explain() string {
	var b strings.Builder
	fmt.Fprintf(&b, "host %s\n", r.Host)
	for _, s := range r.Steps {
		fmt.Fprintf(&b, "  %-4s %-18s %s\n", strings.ToUpper(s.Outcome), s.Rule, s.Detail)
	}
	return b.String()
}

// Warnings returns the details of the steps that passed with a warning.
func (r *Result) Warnings() []string {
	var out []string
	for _, s := range r.Steps {
		if s.Outcome == OutcomeWarn {
			out = append(out, fmt.Sprintf("%s: %s", s.Rule, s.Detail))
		}
	}
	return out
}

type run struct {
	v     *Verifier
	c     *verifierCache
	ctx   context.Context
	ev    *Evidence
	res   *Result
	nonce []byte
	now   time.Time
}

func (r *run) step(rule Rule, outcome, format string, args ...any) {
	r.res.Steps = append(r.res.Steps, Step{Rule: rule, Outcome: outcome, Detail: fmt.Sprintf(format, args...)})
}

func (r *run) pass(rule Rule, format string, args ...any) { r.step(rule, OutcomePass, format, args...) }
func (r *run) skip(rule Rule, format string, args ...any) { r.step(rule, OutcomeSkip, format, args...) }
func (r *run) warn(rule Rule, format string, args ...any) { r.step(rule, OutcomeWarn, format, args...) }

// finish records a refusal as the last step and logs the outcome.
func (v *Verifier) finish(res *Result, err error, what string) error {
	if err != nil {
		err = withHost(err, res.Host)
		var re *RefusalError
		if errors.As(err, &re) {
			res.Steps = append(res.Steps, Step{Rule: re.Rule, Outcome: OutcomeFail, Detail: re.Detail})
		}
		if v.Log != nil {
			v.Log.WithFields(logrus.Fields{"host": res.Host, "error": err.Error()}).Warn(what + " refused")
		}
		return err
	}
	if v.Log != nil {
		f := logrus.Fields{"host": res.Host, "ak": short(res.AKName)}
		if len(res.MKName) > 0 {
			f["mk"] = short(res.MKName)
		}
		if w := res.Warnings(); len(w) > 0 {
			f["warnings"] = w
		}
		v.Log.WithFields(f).Info(what + " passed")
	}
	return nil
}

// Verify runs every rule in a fixed order and stops at the first refusal,
// which it returns as a *RefusalError naming the host and the rule. The
// Result is returned in both cases (for --explain). nonce is the value this
// verifier issued for this evidence.
func (v *Verifier) Verify(ctx context.Context, ev *Evidence, nonce []byte) (*Result, error) {
	res := &Result{}
	if ev != nil {
		res.Host = ev.HostID
	}
	r := &run{v: v, ctx: ctx, ev: ev, res: res, nonce: nonce}
	return res, v.finish(res, r.all(), "attestation")
}

func (r *run) all() error {
	v, ev := r.v, r.ev
	if v.Policy == nil || v.Clock == nil || v.Enrollments == nil {
		return errors.New("attest: Verifier needs Policy, Clock and Enrollments")
	}
	if err := r.ctx.Err(); err != nil {
		return err
	}
	r.c = v.caches()
	// 1. evidence-format
	if ev == nil {
		return malformed("no evidence")
	}
	if err := ev.Validate(); err != nil {
		return err
	}
	ek, err := r.public("ek_public", ev.EKPublic)
	if err != nil {
		return err
	}
	ak, err := r.public("ak_public", ev.AKPublic)
	if err != nil {
		return err
	}
	mk, err := r.public("mk_public", ev.MKPublic)
	if err != nil {
		return err
	}
	var log *logCheck
	if len(ev.EventLog) > 0 {
		if log, err = r.eventLog(ev.EventLog); err != nil {
			return &RefusalError{Rule: RuleEvidenceFormat, Detail: err.Error(), Cause: err}
		}
	}
	r.pass(RuleEvidenceFormat, "version %d, %d quote(s), event log %d bytes", ev.Version, len(ev.Quotes), len(ev.EventLog))

	// 2. nonce: bound to the verifier's own, single-use nonce.
	if len(r.nonce) < MinNonceSize || len(r.nonce) > MaxNonceSize {
		return refuse(RuleNonce, "verifier nonce of %d bytes, want %d..%d", len(r.nonce), MinNonceSize, MaxNonceSize)
	}
	if !bytes.Equal(ev.Nonce, r.nonce) {
		return refuse(RuleNonce, "evidence answers nonce %s, this verifier issued %s", short(ev.Nonce), short(r.nonce))
	}
	if v.Nonces != nil {
		if err := v.Nonces.Consume(r.nonce); err != nil {
			return err
		}
		r.pass(RuleNonce, "nonce %s issued by this verifier, now consumed", short(r.nonce))
	} else {
		r.pass(RuleNonce, "nonce %s matches (single-use not tracked)", short(r.nonce))
	}

	// 3. evidence-age (produced_at is reported by the host: a sanity check)
	r.now = v.Clock()
	if err := r.checkAge(); err != nil {
		return err
	}

	// 4. EK: certificate chain, or enrolment.
	ekCert, err := r.checkEK(ek, ev.EKCert, ev.EKIntermediates)
	if err != nil {
		return err
	}

	// 5. AK shape, enrolment with this EK, and the AK certificate when the
	// host was enrolled on one.
	akName, err := r.checkAK(ak)
	if err != nil {
		return err
	}
	if err := r.checkEnrolled(ek, ak, akName, ekCert); err != nil {
		return err
	}

	// 6. migration key certification.
	if err := VerifyCertify(ak, mk, ev.MKCertifyInfo, ev.MKCertifySig, r.nonce, MKPolicy{AuthPolicy: v.Policy.MK.AuthPolicy}); err != nil {
		return err
	}
	mkName, _ := mk.Name()
	r.res.MKName, r.res.MKPublic = mkName, bytes.Clone(ev.MKPublic)
	r.pass(RuleCertifySignature, "TPM2_Certify signed by the AK")
	r.pass(RuleCertifyNonce, "certify extraData is the nonce")
	r.pass(RuleMKName, "certified name %s is the migration key's", short(mkName))
	r.pass(RuleMKAttributes, "ECC P-256 restricted decrypt, AES-128-CFB, fixedTPM, fixedParent, sensitiveDataOrigin, !sign")
	r.pass(RuleMKPolicy, "authPolicy %s as required", short(mk.Pub.AuthPolicy.Buffer))

	// 7. quotes.
	pcrs := ev.PCRValues()
	r.res.PCRs = pcrs
	cov, err := r.checkQuotes(ak, pcrs)
	if err != nil {
		return err
	}

	// 8. golden PCR values.
	if err := r.checkGolden(pcrs, cov); err != nil {
		return err
	}

	// 9. event log: replay, then facts.
	return r.checkEventLog(log, pcrs, cov)
}

// public parses a TPMT_PUBLIC of the evidence, from the cache when the
// same bytes were parsed before.
func (r *run) public(what string, raw []byte) (*Public, error) {
	k := keyOf("tpmt_public", raw)
	if p, ok := r.c.publics.get(k); ok {
		return p, nil
	}
	p, err := ParsePublic(what, bytes.Clone(raw))
	if err != nil {
		return nil, &RefusalError{Rule: RuleEvidenceFormat, Detail: err.Error(), Cause: err}
	}
	p.prepare()
	r.c.publics.put(k, p, 1)
	return p, nil
}

func (r *run) checkAge() error {
	ev, pol := r.ev, r.v.Policy
	age := r.now.Sub(ev.ProducedAt)
	switch {
	case age < -maxClockSkew:
		return refuse(RuleEvidenceAge, "produced_at %s is in the future (now %s)", ev.ProducedAt.UTC().Format(time.RFC3339), r.now.UTC().Format(time.RFC3339))
	case pol.MaxEvidenceAge > 0 && age > pol.MaxEvidenceAge:
		return refuse(RuleEvidenceAge, "evidence produced %s ago, policy allows %s", age.Round(time.Second), pol.MaxEvidenceAge)
	case pol.MaxEvidenceAge > 0:
		r.pass(RuleEvidenceAge, "produced %s ago (max %s)", age.Round(time.Second), pol.MaxEvidenceAge)
	default:
		r.skip(RuleEvidenceAge, "policy sets no max_evidence_age")
	}
	return nil
}

// checkAK checks the AK's shape and returns its name.
func (r *run) checkAK(ak *Public) ([]byte, error) {
	if err := CheckAK(ak); err != nil {
		return nil, err
	}
	akName, err := ak.Name()
	if err != nil {
		return nil, refuse(RuleAKAttributes, "AK name: %v", err)
	}
	r.res.AKName = akName
	r.pass(RuleAKAttributes, "AK %s is a restricted fixedTPM signing key", short(akName))
	return akName, nil
}

// checkQuotes verifies every quote and returns what they cover.
func (r *run) checkQuotes(ak *Public, pcrs PCRValues) (coverage, error) {
	ev, pol := r.ev, r.v.Policy
	var quotes []*QuoteResult
	for i, q := range ev.Quotes {
		qr, err := VerifyQuote(ak, q.Attest, q.Signature, r.nonce, pcrs)
		if err != nil {
			var re *RefusalError
			if errors.As(err, &re) && len(ev.Quotes) > 1 {
				re.Detail = fmt.Sprintf("quote %d: %s", i, re.Detail)
			}
			return nil, err
		}
		quotes = append(quotes, qr)
	}
	cov := coverage{}
	var sels []string
	for _, q := range quotes {
		sels = append(sels, q.String())
		for _, s := range q.Selections {
			for _, i := range s.PCRs {
				cov.add(s.Bank, i)
			}
		}
	}
	r.pass(RuleQuoteSignature, "%d quote(s) signed by the AK: %s", len(quotes), strings.Join(sels, "; "))
	r.pass(RuleQuoteNonce, "quote extraData is the nonce")
	r.pass(RulePCRDigest, "pcrDigest matches the reported PCR values")
	for _, i := range pol.Quote.PCRs {
		if !cov.covers(pol.Quote.Bank, i) {
			return nil, refuse(RulePCRSelection, "policy requires %s PCR %d, the quote does not cover it", pol.Quote.Bank, i)
		}
	}
	r.pass(RulePCRSelection, "quote covers %s PCRs %v", pol.Quote.Bank, pol.Quote.PCRs)
	return cov, nil
}

// coverage is the set of (bank, PCR) pairs the quotes cover.
type coverage map[Bank]uint32

func (c coverage) add(b Bank, i int) {
	if i >= 0 && i < 32 {
		c[b] |= 1 << i
	}
}

func (c coverage) covers(b Bank, i int) bool { return i >= 0 && i < 32 && c[b]&(1<<i) != 0 }
