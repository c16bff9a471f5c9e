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
	return &IdentityResponse{Host: n.cfg.Host, EKCert: id.EK.Cert, EKPublic: id.EK.Public, AKPublic: id.AK.Public}, nil
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
	EKChain  string // the verified EK certificate path, leaf first
	EKDigest []byte
	AKName   []byte
}

// Enroll verifies host's EK certificate against this node's roots and
// policy, activates its AK, and records the enrolment. Until a host is
// enrolled, evidence from it is refused (rule ak-activation).
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
	if err := enrollments.Add(ctx, ch.Enrollment(host, n.cfg.Now())); err != nil {
		return nil, fmt.Errorf("enroll %s: record: %w", host, err)
	}
	n.audit(ctx, AuditEvent{Event: audit.EventHostEnrolled, Peer: host, Detail: fmt.Sprintf("EK %x AK %x", ch.EKDigest[:8], ch.AKName[:10])})
	return &EnrollResult{Host: host, EKChain: chain.String(), EKDigest: ch.EKDigest, AKName: ch.AKName}, nil
}

func ruleOf(err error) string {
	if re, ok := asRefusal(err); ok {
		return string(re.Rule)
	}
	return ""
}
