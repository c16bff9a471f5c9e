package attest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
)

// maxClockSkew is how far in the future produced_at may be.
const maxClockSkew = 2 * time.Minute

// Verifier applies the policy to evidence. All fields but Nonces are
// required; Roots may be empty when every EK is enrolled instead.
type Verifier struct {
	Roots       *RootStore
	Policy      *Policy
	Enrollments Enrollments
	// Nonces, when set, makes every nonce single-use: Verify consumes it.
	Nonces NonceConsumer
	Clock  func() time.Time
	Log    logrus.FieldLogger
}

// Step is one rule's outcome.
type Step struct {
	Rule    Rule   `json:"rule"`
	Outcome string `json:"outcome"` // "pass", "fail" or "skip"
	Detail  string `json:"detail"`
}

// Result is the step-by-step account of a verification. On success it
// carries what the caller needs next (the migration key to wrap for).
type Result struct {
	Host     string     `json:"host"`
	Steps    []Step     `json:"steps"`
	EKChain  Chain      `json:"-"`
	AKName   HexBytes   `json:"ak_name,omitempty"`
	MKName   HexBytes   `json:"mk_name,omitempty"`
	MKPublic HexBytes   `json:"mk_public,omitempty"` // TPMT_PUBLIC to wrap keys for
	PCRs     PCRValues  `json:"-"`
	Facts    *BootFacts `json:"-"`
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

type run struct {
	v     *Verifier
	ctx   context.Context
	ev    *Evidence
	res   *Result
	nonce []byte
}

func (r *run) pass(rule Rule, format string, args ...any) {
	r.res.Steps = append(r.res.Steps, Step{Rule: rule, Outcome: "pass", Detail: fmt.Sprintf(format, args...)})
}

func (r *run) skip(rule Rule, format string, args ...any) {
	r.res.Steps = append(r.res.Steps, Step{Rule: rule, Outcome: "skip", Detail: fmt.Sprintf(format, args...)})
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
	err := r.all()
	if err != nil {
		err = withHost(err, res.Host)
		var re *RefusalError
		if errors.As(err, &re) {
			res.Steps = append(res.Steps, Step{Rule: re.Rule, Outcome: "fail", Detail: re.Detail})
		}
		if v.Log != nil {
			v.Log.WithFields(logrus.Fields{"host": res.Host, "error": err.Error()}).Warn("attestation refused")
		}
		return res, err
	}
	if v.Log != nil {
		v.Log.WithFields(logrus.Fields{"host": res.Host, "ak": short(res.AKName), "mk": short(res.MKName)}).Info("attestation passed")
	}
	return res, nil
}

func (r *run) all() error {
	v, ev := r.v, r.ev
	if v.Policy == nil || v.Clock == nil || v.Enrollments == nil {
		return errors.New("attest: Verifier needs Policy, Clock and Enrollments")
	}
	if err := r.ctx.Err(); err != nil {
		return err
	}
	// 1. evidence-format
	if ev == nil {
		return malformed("no evidence")
	}
	if err := ev.Validate(); err != nil {
		return err
	}
	ek, err := ParsePublic("ek_public", ev.EKPublic)
	if err != nil {
		return &RefusalError{Rule: RuleEvidenceFormat, Detail: err.Error(), Cause: err}
	}
	ak, err := ParsePublic("ak_public", ev.AKPublic)
	if err != nil {
		return &RefusalError{Rule: RuleEvidenceFormat, Detail: err.Error(), Cause: err}
	}
	mk, err := ParsePublic("mk_public", ev.MKPublic)
	if err != nil {
		return &RefusalError{Rule: RuleEvidenceFormat, Detail: err.Error(), Cause: err}
	}
	var log *EventLog
	if len(ev.EventLog) > 0 {
		if log, err = ParseEventLog(ev.EventLog); err != nil {
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
	now := v.Clock()
	age := now.Sub(ev.ProducedAt)
	switch {
	case age < -maxClockSkew:
		return refuse(RuleEvidenceAge, "produced_at %s is in the future (now %s)", ev.ProducedAt.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	case v.Policy.MaxEvidenceAge > 0 && age > v.Policy.MaxEvidenceAge:
		return refuse(RuleEvidenceAge, "evidence produced %s ago, policy allows %s", age.Round(time.Second), v.Policy.MaxEvidenceAge)
	case v.Policy.MaxEvidenceAge > 0:
		r.pass(RuleEvidenceAge, "produced %s ago (max %s)", age.Round(time.Second), v.Policy.MaxEvidenceAge)
	default:
		r.skip(RuleEvidenceAge, "policy sets no max_evidence_age")
	}

	// 4. EK: certificate chain, or enrolment.
	if err := r.checkEK(ek, now); err != nil {
		return err
	}

	// 5. AK shape and activation with this EK.
	if err := CheckAK(ak); err != nil {
		return err
	}
	akName, err := ak.Name()
	if err != nil {
		return refuse(RuleAKAttributes, "AK name: %v", err)
	}
	r.res.AKName = akName
	r.pass(RuleAKAttributes, "AK %s is a restricted fixedTPM signing key", short(akName))
	ok, err := v.Enrollments.Activated(r.ctx, ek.Digest(), akName)
	if err != nil {
		return fmt.Errorf("enrollments: %w", err)
	}
	if !ok {
		return refuse(RuleAKActivation, "AK %s was never activated with EK %s", short(akName), short(ek.Digest()))
	}
	r.pass(RuleAKActivation, "AK activated with EK %s (enrolment record)", short(ek.Digest()))

	// 6. migration key certification.
	if err := VerifyCertify(ak, mk, ev.MKCertifyInfo, ev.MKCertifySig, r.nonce, MKPolicy{AuthPolicy: v.Policy.MK.AuthPolicy}); err != nil {
		return err
	}
	mkName, _ := mk.Name()
	r.res.MKName, r.res.MKPublic = mkName, ev.MKPublic
	r.pass(RuleCertifySignature, "TPM2_Certify signed by the AK")
	r.pass(RuleCertifyNonce, "certify extraData is the nonce")
	r.pass(RuleMKName, "certified name %s is the migration key's", short(mkName))
	r.pass(RuleMKAttributes, "ECC P-256 restricted decrypt, AES-128-CFB, fixedTPM, fixedParent, sensitiveDataOrigin, !sign")
	r.pass(RuleMKPolicy, "authPolicy %s as required", short(mk.Pub.AuthPolicy.Buffer))

	// 7. quotes.
	pcrs := ev.PCRValues()
	r.res.PCRs = pcrs
	var quotes []*QuoteResult
	for i, q := range ev.Quotes {
		qr, err := VerifyQuote(ak, q.Attest, q.Signature, r.nonce, pcrs)
		if err != nil {
			var re *RefusalError
			if errors.As(err, &re) && len(ev.Quotes) > 1 {
				re.Detail = fmt.Sprintf("quote %d: %s", i, re.Detail)
			}
			return err
		}
		quotes = append(quotes, qr)
	}
	covered := func(bank Bank, i int) bool {
		for _, q := range quotes {
			if q.Covers(bank, i) {
				return true
			}
		}
		return false
	}
	var sels []string
	for _, q := range quotes {
		sels = append(sels, q.String())
	}
	r.pass(RuleQuoteSignature, "%d quote(s) signed by the AK: %s", len(quotes), strings.Join(sels, "; "))
	r.pass(RuleQuoteNonce, "quote extraData is the nonce")
	r.pass(RulePCRDigest, "pcrDigest matches the reported PCR values")
	for _, i := range v.Policy.Quote.PCRs {
		if !covered(v.Policy.Quote.Bank, i) {
			return refuse(RulePCRSelection, "policy requires %s PCR %d, the quote does not cover it", v.Policy.Quote.Bank, i)
		}
	}
	r.pass(RulePCRSelection, "quote covers %s PCRs %v", v.Policy.Quote.Bank, v.Policy.Quote.PCRs)

	// 8. golden PCR values.
	if err := r.checkGolden(pcrs, covered); err != nil {
		return err
	}

	// 9. event log: replay, then facts.
	return r.checkEventLog(log, pcrs, covered)
}

func (r *run) checkEK(ek *Public, now time.Time) error {
	ev, v := r.ev, r.v
	if len(ev.EKCert) == 0 {
		// No certificate: the EK must have been enrolled by the operator
		// (activation records are keyed by EK digest and checked below).
		r.skip(RuleEKChain, "no EK certificate: relying on the enrolled EK %s", short(ek.Digest()))
		return nil
	}
	certs, err := ParseCertificates(ev.EKCert)
	if err != nil {
		return refuse(RuleEKChain, "EK certificate: %v", err)
	}
	var inter []*Cert
	for i, d := range ev.EKIntermediates {
		c, err := ParseCertificate(d)
		if err != nil {
			return refuse(RuleEKChain, "EK intermediate %d: %v", i, err)
		}
		inter = append(inter, c)
	}
	chain, err := v.Roots.VerifyEK(certs[0], inter, v.Policy.EK, now)
	if err != nil {
		return err
	}
	r.res.EKChain = chain
	var labels []string
	for _, l := range chain {
		labels = append(labels, l.Cert.Label())
	}
	r.pass(RuleEKChain, "EK certificate chains to trust anchor %q", chain[len(chain)-1].Cert.Label())
	r.pass(RuleEKSignature, "%d signature(s) verified on the path", len(chain)-1)
	if v.Policy.EK.CheckValidity {
		r.pass(RuleEKValidity, "every certificate valid at %s", now.UTC().Format(time.RFC3339))
	} else {
		r.skip(RuleEKValidity, "policy ek.check_validity is false")
	}
	key, err := ek.CryptoKey()
	if err != nil {
		return refuse(RuleEKPublic, "EK public area: %v", err)
	}
	if certs[0].PublicKey == nil || !sameKey(key, certs[0].PublicKey) {
		return refuse(RuleEKPublic, "the EK certificate certifies another key than the EK public area %s", short(ek.Digest()))
	}
	r.pass(RuleEKPublic, "EK public area %s is the certified key", short(ek.Digest()))
	return nil
}

func (r *run) checkGolden(pcrs PCRValues, covered func(Bank, int) bool) error {
	gp := r.v.Policy.GoldenPCRs
	if len(gp) == 0 {
		r.skip(RulePCRPolicy, "policy has no golden PCR values")
		return nil
	}
	banks := make([]string, 0, len(gp))
	for b := range gp {
		banks = append(banks, string(b))
	}
	sort.Strings(banks)
	n := 0
	for _, b := range banks {
		bank := Bank(b)
		idx := make([]int, 0, len(gp[bank]))
		for k := range gp[bank] {
			i, _ := strconv.Atoi(k)
			idx = append(idx, i)
		}
		sort.Ints(idx)
		for _, i := range idx {
			want := gp[bank][strconv.Itoa(i)]
			got, ok := pcrs[bank][i]
			if !ok || !covered(bank, i) {
				return refuse(RulePCRPolicy, "PCR %d (%s) has a golden value but is not quoted", i, bank)
			}
			match := false
			for _, w := range want {
				match = match || bytes.Equal(got, w)
			}
			if !match {
				return refuse(RulePCRPolicy, "PCR %d differs from policy (%s got %s, want %s)", i, bank, short(got), short(want[0]))
			}
			n++
		}
	}
	r.pass(RulePCRPolicy, "%d PCR value(s) equal to policy", n)
	return nil
}

func (r *run) checkEventLog(log *EventLog, pcrs PCRValues, covered func(Bank, int) bool) error {
	pol := r.v.Policy.EventLog
	needLog := pol.Required || pol.RequireSecureBoot || len(pol.AllowedBootComponents) > 0
	if log == nil {
		if needLog {
			return refuse(RuleEventLogReplay, "policy requires an event log, the evidence has none")
		}
		r.skip(RuleEventLogReplay, "no event log and the policy does not require one")
		return nil
	}
	replay := log.Replay()
	n := 0
	for _, bank := range log.Banks {
		for _, i := range replay.PCRs(bank) {
			if !covered(bank, i) {
				continue
			}
			got := replay[bank][i]
			if !bytes.Equal(got, pcrs[bank][i]) {
				return refuse(RuleEventLogReplay, "%s PCR %d: the log replays to %s, the quote says %s", bank, i, short(got), short(pcrs[bank][i]))
			}
			n++
		}
	}
	if n == 0 {
		return refuse(RuleEventLogReplay, "no quoted PCR is extended by the event log")
	}
	// The facts below come from PCR 7 and PCR 4: they must be covered.
	mustCover := func(pcr int) error {
		for _, bank := range log.Banks {
			if _, ok := replay[bank][pcr]; ok && covered(bank, pcr) {
				return nil
			}
		}
		return refuse(RuleEventLogReplay, "PCR %d carries a policy fact but is not quoted in a bank of the log", pcr)
	}
	if pol.RequireSecureBoot {
		if err := mustCover(7); err != nil {
			return err
		}
	}
	if len(pol.AllowedBootComponents) > 0 {
		if err := mustCover(4); err != nil {
			return err
		}
	}
	r.pass(RuleEventLogReplay, "%d event(s) replay to %d quoted PCR value(s)", len(log.Events), n)
	facts, err := log.Facts()
	if err != nil {
		return refuse(RuleEventLogReplay, "%v", err)
	}
	r.res.Facts = &facts
	switch {
	case !pol.RequireSecureBoot:
		r.skip(RuleSecureBoot, "policy does not require secure boot")
	case facts.SecureBoot == nil:
		return refuse(RuleSecureBoot, "the event log does not measure the SecureBoot variable")
	case !*facts.SecureBoot:
		return refuse(RuleSecureBoot, "SecureBoot variable is 0 in the event log (PCR 7)")
	default:
		r.pass(RuleSecureBoot, "SecureBoot variable is 1 (PCR 7)")
	}
	if len(pol.AllowedBootComponents) == 0 {
		r.skip(RuleBootComponent, "policy lists no boot components")
		return nil
	}
	for _, ev := range facts.BootComponents {
		ok := false
		for _, d := range ev.Digests {
			for _, a := range pol.AllowedBootComponents {
				ok = ok || bytes.Equal(d, a)
			}
		}
		if !ok {
			var ds []string
			for b, d := range ev.Digests {
				ds = append(ds, fmt.Sprintf("%s %s", b, short(d)))
			}
			sort.Strings(ds)
			return refuse(RuleBootComponent, "boot application at event %d (%s) is not in the allowed list", ev.Index, strings.Join(ds, ", "))
		}
	}
	r.pass(RuleBootComponent, "%d boot application(s) all allowed", len(facts.BootComponents))
	return nil
}

// CheckEK verifies a host's EK certificate (DER, with optional untrusted
// intermediates) against the roots and the policy, and that it certifies
// ekPub (TPMT_PUBLIC). Enrolment runs it before challenging an AK, so only
// a genuine TPM's AK is ever enrolled.
func (v *Verifier) CheckEK(ctx context.Context, host string, ekCert []byte, intermediates [][]byte, ekPub []byte) (Chain, error) {
	if v.Policy == nil || v.Clock == nil || v.Roots == nil {
		return nil, fmt.Errorf("attest: CheckEK needs Policy, Clock and Roots")
	}
	ek, err := ParsePublic("EK", ekPub)
	if err != nil {
		return nil, withHost(err, host)
	}
	if len(ekCert) == 0 {
		return nil, withHost(refuse(RuleEKChain, "the host presents no EK certificate: enrol its EK out of band"), host)
	}
	r := &run{v: v, ctx: ctx, ev: &Evidence{HostID: host, EKCert: ekCert, EKIntermediates: intermediates}, res: &Result{Host: host}}
	if err := r.checkEK(ek, v.Clock()); err != nil {
		return nil, withHost(err, host)
	}
	return r.res.EKChain, nil
}
