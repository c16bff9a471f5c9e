package migrate

import (
	"context"
	"fmt"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/internal/ids"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// Enrolment: before a host can receive vTPMs, each host that may send to
// it verifies its EK certificate and activates its AK (TPM2_ActivateCredential
// against the EK), then records the (EK, AK) pair. These two calls are the
// host's side; the verifier's side is Node.Enroll.

// IdentityRequest asks a host for its TPM identity.
type IdentityRequest struct {
	From string `json:"from"`
}

// IdentityResponse is a host's EK certificate, EK public area and AK public area.
type IdentityResponse struct {
	Host            string   `json:"host"`
	EKCert          []byte   `json:"ek_cert,omitempty"` // DER, as read from NV
	EKIntermediates [][]byte `json:"ek_intermediates,omitempty"`
	EKPublic        []byte   `json:"ek_public"` // TPMT_PUBLIC
	AKPublic        []byte   `json:"ak_public"` // TPMT_PUBLIC
	// AKCert is the host's AK certificate (DER), when it has one: a
	// verifier whose policy allows it enrols the host on it instead of a
	// credential activation.
	AKCert []byte `json:"ak_cert,omitempty"`
}

// ActivateRequest carries an activation challenge for the host's TPM.
type ActivateRequest struct {
	From      string                     `json:"from"`
	Challenge attest.ActivationChallenge `json:"challenge"`
}

// ActivateResponse is the secret the host's TPM recovered.
type ActivateResponse struct {
	Secret []byte `json:"secret"`
}

// Identity returns this host's TPM identity (read once, at start).
func (n *Node) Identity(ctx context.Context, req *IdentityRequest) (*IdentityResponse, error) {
	if !ids.IsHostID(req.From) {
		return nil, fmt.Errorf("identity: %w: from %q", ErrBadMessage, req.From)
	}
	id := n.cfg.Identity
	return &IdentityResponse{Host: n.cfg.Host, EKCert: id.EK.Cert, EKPublic: id.EK.Public, AKPublic: id.AK.Public, AKCert: id.AKCert}, nil
}

// Activate answers an activation challenge with this host's TPM: only the
// TPM holding the EK can open it, and only for its own AK.
func (n *Node) Activate(ctx context.Context, req *ActivateRequest) (*ActivateResponse, error) {
	if !ids.IsHostID(req.From) {
		return nil, fmt.Errorf("activate: %w: from %q", ErrBadMessage, req.From)
	}
	n.tpmMu.Lock()
	secret, err := identity.ActivateCredential(ctx, n.cfg.TPM, n.cfg.Identity, &req.Challenge)
	n.tpmMu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("activate: %w", err)
	}
	n.log.WithField("requester", req.From).Info("answered an activation challenge")
	return &ActivateResponse{Secret: secret}, nil
}

// EnrollResult reports an enrolment.
type EnrollResult struct {
	Host     string
	EKChain  string // the verified EK certificate path, leaf first (activation)
	EKDigest []byte
	AKName   []byte
	// Record is what was recorded in the enrolments store: with a fleet
	// registry, the operator writes it there (vtpmctl host enroll).
	Record attest.Enrollment
}

// Enroll verifies host's TPM and records the enrolment: on its AK
// certificate when the host presents one and the policy allows it
// (attest.Verifier.EnrollByAKCertificate), otherwise by checking its EK
// certificate against this node's roots and policy and activating its AK
// (TPM2_ActivateCredential against the EK). Until a host is enrolled,
// evidence from it is refused (rule ak-activation).
func (n *Node) Enroll(ctx context.Context, host string, enrollments attest.Enrollments) (*EnrollResult, error) {
	if n.cfg.Verifier == nil {
		return nil, fmt.Errorf("enroll %s: %w: this host has no attestation policy configured", host, ErrRefused)
	}
	peer, err := n.cfg.Dial(ctx, host)
	if err != nil {
		return nil, fmt.Errorf("enroll %s: %w: %w", host, ErrPeer, err)
	}
	id, err := peer.Identity(ctx, &IdentityRequest{From: n.cfg.Host})
	if err != nil {
		return nil, fmt.Errorf("enroll %s: identity: %w", host, err)
	}
	if id.Host != host {
		return nil, fmt.Errorf("enroll %s: %w: the peer says it is %q", host, ErrRefused, id.Host)
	}
	v := n.cfg.Verifier
	if len(id.AKCert) > 0 && v.Policy != nil && v.Policy.Enrollment.Allows(attest.MethodAKCertificate) {
		return n.enrollByAKCert(ctx, host, id, enrollments)
	}
	chain, err := n.cfg.Verifier.CheckEK(ctx, host, id.EKCert, id.EKIntermediates, id.EKPublic)
	if err != nil {
		n.audit(ctx, AuditEvent{Event: audit.EventEnrollRefused, Peer: host, Rule: ruleOf(err), Detail: err.Error()})
		return nil, fmt.Errorf("enroll %s: %w: %w", host, ErrRefused, err)
	}
	ch, err := attest.NewActivationChallenge(n.cfg.Rand, id.EKPublic, id.AKPublic)
	if err != nil {
		return nil, fmt.Errorf("enroll %s: %w: %w", host, ErrRefused, err)
	}
	ans, err := peer.Activate(ctx, &ActivateRequest{From: n.cfg.Host, Challenge: *ch})
	if err != nil {
		return nil, fmt.Errorf("enroll %s: activate: %w", host, err)
	}
	if err := attest.VerifyActivation(ch, ans.Secret); err != nil {
		n.audit(ctx, AuditEvent{Event: audit.EventEnrollRefused, Peer: host, Rule: ruleOf(err), Detail: err.Error()})
		return nil, fmt.Errorf("enroll %s: %w: %w", host, ErrRefused, err)
	}
	rec := ch.Enrollment(host, n.cfg.Now())
	if err := enrollments.Add(ctx, rec); err != nil {
		if _, ok := asRefusal(err); ok {
			// One TPM, one host: this EK or AK is enrolled for another
			// host (rule enrolled-host).
			n.audit(ctx, AuditEvent{Event: audit.EventEnrollRefused, Peer: host, Rule: ruleOf(err), Detail: err.Error()})
			return nil, fmt.Errorf("enroll %s: %w: %w", host, ErrRefused, err)
		}
		return nil, fmt.Errorf("enroll %s: record: %w", host, err)
	}
	n.audit(ctx, AuditEvent{Event: audit.EventHostEnrolled, Peer: host, Detail: fmt.Sprintf("EK %x AK %x", ch.EKDigest[:8], ch.AKName[:10])})
	return &EnrollResult{Host: host, EKChain: chain.String(), EKDigest: ch.EKDigest, AKName: ch.AKName, Record: rec}, nil
}

// enrollByAKCert enrols host on its AK certificate: no activation round
// trip (the AK certificate's issuer vouches that the AK lives in the TPM
// whose EK it names).
func (n *Node) enrollByAKCert(ctx context.Context, host string, id *IdentityResponse, enrollments attest.Enrollments) (*EnrollResult, error) {
	v := n.cfg.Verifier
	ev := &attest.Verifier{Roots: v.Roots, AKRoots: v.AKRoots, Policy: v.Policy, Enrollments: enrollments, Clock: v.Clock, Log: v.Log}
	if ev.Clock == nil {
		ev.Clock = n.cfg.Now
	}
	res, err := ev.EnrollByAKCertificate(ctx, attest.AKCertEnrollment{Host: host, EKPublic: id.EKPublic, EKCert: id.EKCert,
		EKIntermediates: id.EKIntermediates, AKPublic: id.AKPublic, AKCert: id.AKCert})
	if err != nil {
		n.audit(ctx, AuditEvent{Event: audit.EventEnrollRefused, Peer: host, Rule: ruleOf(err), Detail: err.Error()})
		if _, ok := asRefusal(err); ok {
			return nil, fmt.Errorf("enroll %s: %w: %w", host, ErrRefused, err)
		}
		return nil, fmt.Errorf("enroll %s: %w", host, err)
	}
	rec := *res.Enrollment
	n.audit(ctx, AuditEvent{Event: audit.EventHostEnrolled, Peer: host, Detail: fmt.Sprintf("EK %x AK %x on its AK certificate", rec.EKDigest[:8], rec.AKName[:10])})
	return &EnrollResult{Host: host, EKChain: "AK certificate " + fmt.Sprintf("%x", rec.AKCertDigest), EKDigest: rec.EKDigest, AKName: rec.AKName, Record: rec}, nil
}

func ruleOf(err error) string {
	if re, ok := asRefusal(err); ok {
		return string(re.Rule)
	}
	return ""
}
