package attest

import (
	"context"
	"errors"
	"fmt"
)

// checkEnrolled applies rule ak-activation (the (EK, AK) pair has an
// enrolment record), enrollment-method (the record's method is allowed by
// the policy) and, for hosts enrolled on an AK certificate, the ak-cert-*
// rules to the certificate in the evidence.
func (r *run) checkEnrolled(ek, ak *Public, akName []byte, ekCert *Cert) error {
	v, ev := r.v, r.ev
	rec, err := lookupEnrollment(r.ctx, v.Enrollments, ek.Digest(), akName)
	if err != nil {
		return fmt.Errorf("enrollments: %w", err)
	}
	if rec == nil {
		return refuse(RuleAKActivation, "AK %s was never activated with EK %s", short(akName), short(ek.Digest()))
	}
	method := rec.method()
	r.pass(RuleAKActivation, "AK enrolled with EK %s by %s (enrolment record)", short(ek.Digest()), method)
	if !v.Policy.Enrollment.Allows(method) {
		return refuse(RuleEnrollmentMethod, "the host was enrolled by %s, policy enrollment is %s", method, v.Policy.Enrollment)
	}
	if method != MethodAKCertificate {
		if len(ev.AKCert) > 0 {
			r.skip(RuleAKCertChain, "enrolled by activation; the AK certificate in the evidence is not used")
		}
		return nil
	}
	r.pass(RuleEnrollmentMethod, "enrolled on an AK certificate, policy enrollment is %s", v.Policy.Enrollment)
	return r.akCert(ak, ek, ekCert, ev.AKCert, ev.AKIntermediates)
}

// AKCertEnrollment is what a host presents to be enrolled on its AK
// certificate instead of answering an activation challenge: its TPM
// identity as read by vtpm/identity (LoadIdentity with an AK certificate
// source).
type AKCertEnrollment struct {
	Host            string
	EKPublic        []byte   // TPMT_PUBLIC
	EKCert          []byte   // DER, optional
	EKIntermediates [][]byte // untrusted path helpers
	AKPublic        []byte   // TPMT_PUBLIC
	AKCert          []byte   // DER (PEM and the TCG NV header are accepted)
	AKIntermediates [][]byte // untrusted path helpers
}

// EnrollByAKCertificate enrols a host on its AK certificate: it checks, in
// this order, that the policy's enrollment is ak-certificate or either
// (rule enrollment-method), the EK certificate when there is one (ek-*
// rules, as CheckEK), the AK's shape (ak-attributes) and the AK
// certificate (ak-cert-chain, ak-cert-signature, ak-cert-validity,
// ak-cert-key, ak-cert-usage, ak-cert-binding); then it records the (EK, AK)
// pair with method ak-certificate in Enrollments. Verify accepts evidence
// from the host afterwards as long as its AK certificate still verifies.
//
// The Result explains every step (Result.Explain) and carries the record
// (Result.Enrollment). Refusals are *RefusalError, like Verify's.
func (v *Verifier) EnrollByAKCertificate(ctx context.Context, req AKCertEnrollment) (*Result, error) {
	res := &Result{Host: req.Host}
	if v.Policy == nil || v.Clock == nil || v.Enrollments == nil {
		return res, errors.New("attest: EnrollByAKCertificate needs Policy, Clock and Enrollments")
	}
	r := &run{v: v, c: v.caches(), ctx: ctx, res: res, now: v.Clock(), ev: &Evidence{HostID: req.Host, AKCert: req.AKCert, AKIntermediates: req.AKIntermediates}}
	return res, v.finish(res, r.enrollAKCert(req), "AK certificate enrolment")
}

func (r *run) enrollAKCert(req AKCertEnrollment) error {
	v := r.v
	if err := r.ctx.Err(); err != nil {
		return err
	}
	if !validHostID(req.Host) {
		return malformed("host_id missing or not printable")
	}
	if !v.Policy.Enrollment.Allows(MethodAKCertificate) {
		return refuse(RuleEnrollmentMethod, "policy enrollment is %s: enrol this host by credential activation", v.Policy.Enrollment)
	}
	r.pass(RuleEnrollmentMethod, "policy enrollment %s allows an AK certificate", v.Policy.Enrollment)
	if len(req.AKCert) > maxCertSize || len(req.EKCert) > maxCertSize || len(req.AKIntermediates) > maxChainDepth || len(req.EKIntermediates) > maxChainDepth {
		return malformed("certificate chain too large")
	}
	ek, err := r.public("ek_public", req.EKPublic)
	if err != nil {
		return err
	}
	ak, err := r.public("ak_public", req.AKPublic)
	if err != nil {
		return err
	}
	ekCert, err := r.checkEK(ek, req.EKCert, req.EKIntermediates)
	if err != nil {
		return err
	}
	akName, err := r.checkAK(ak)
	if err != nil {
		return err
	}
	if err := r.akCert(ak, ek, ekCert, req.AKCert, req.AKIntermediates); err != nil {
		return err
	}
	e := Enrollment{Host: req.Host, EKDigest: ek.Digest(), AKName: akName, EnrolledAt: r.now.UTC(),
		Method: MethodAKCertificate, AKCertDigest: akCertDigest(req.AKCert)}
	if err := v.Enrollments.Add(r.ctx, e); err != nil {
		return fmt.Errorf("enrollments: %w", err)
	}
	r.res.Enrollment = &e
	return nil
}
