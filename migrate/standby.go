package migrate

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strconv"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/internal/ids"
	"github.com/vtpmm/vtpmm/internal/strictjson"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// Standby replicas (issue 15, docs/failover.md). The owner of a VM sends
// each of its standbys a replica: the VM key under a fresh transfer key
// wrapped for the standby's attested migration key (the attestation and
// the software wrapping of a migration, cached per standby while its
// evidence is fresh: 0 host TPM commands on the owner), with the VM's
// vTPM state as it is at rest (encrypted under the VM key). The standby
// authorises it like a Prepare (the sender enrolled and the registry's
// owner at that generation), stores it as it came (the key stays wrapped
// for its TPM: no plaintext key on disk), records its standby record at
// that generation, and cannot start from it: CheckStart refuses (rule
// standby-replica) until a failover promotes it (failover.go).

// Rules of replica refusals.
const (
	RuleReplicaOwner    = "replica-owner"    // the sender is not the registry's owner at the replica's generation
	RuleReplicaKey      = "replica-key"      // the replica is not wrapped for this host's migration key
	RuleReplicaHeld     = "replica-held"     // this host holds the VM's key at that generation or above
	RuleStandbyAssigned = "standby-assigned" // this host is not assigned as a standby of the VM
	RuleStandbyReplica  = "standby-replica"  // a start from a replica (never)
	RuleSelfFence       = "self-fence"       // this host's liveness lease is gone: it hands out no key
)

// maxReplicaMessage bounds a decoded ReplicaRequest (the state included).
const maxReplicaMessage = 6 << 20

// ReplicaRequest is one replica refresh from the owner to a standby.
type ReplicaRequest struct {
	Version    int    `json:"version"`
	ID         string `json:"id"` // random per refresh (32 hex digits)
	Owner      string `json:"owner"`
	Standby    string `json:"standby"`
	VM         string `json:"vm"`
	Name       string `json:"name,omitempty"`
	Generation uint64 `json:"generation"` // the owner's generation
	// KeyID names the key the transfer key is wrapped for: hex SHA-256 of
	// the standby's certified migration key's public area.
	KeyID          string              `json:"key_id"`
	EvidenceDigest []byte              `json:"evidence_digest"`
	TransferKey    identity.WrappedKey `json:"transfer_key"`
	Nonce          []byte              `json:"nonce"`
	Ciphertext     []byte              `json:"ct"`
	StateSHA256    []byte              `json:"state_sha256"`
	State          []byte              `json:"state"`
	// DomainXML is the VM's domain as the owner's hypervisor describes it
	// for another host (libvirt: VIR_DOMAIN_XML_SECURE|MIGRATABLE), so that a
	// standby where the domain is not defined defines it at promotion;
	// empty when the owner's hypervisor cannot describe it.
	DomainXML string `json:"domain_xml,omitempty"`
}

// maxDomainXML bounds ReplicaRequest.DomainXML.
const maxDomainXML = 1 << 20

// DomainDescriber is a hypervisor that describes a VM's domain for
// another host to define it (hypervisor/libvirt); the owner sends the
// description with each replica.
type DomainDescriber interface {
	MigratableDomainXML(ctx context.Context, vmUUID string) (string, error)
}

// ReplicaResponse acknowledges a stored replica.
type ReplicaResponse struct {
	VM         string `json:"vm"`
	Generation uint64 `json:"generation"`
	Stored     int    `json:"stored"` // bytes written on the standby
}

// Replicator is a peer that takes replicas (the Node; the agent wire's
// remote peers).
type Replicator interface {
	Replicate(ctx context.Context, req *ReplicaRequest) (*ReplicaResponse, error)
}

var _ Replicator = (*Node)(nil)

// DecodeReplica decodes and validates a ReplicaRequest (untrusted input).
func DecodeReplica(b []byte) (*ReplicaRequest, error) {
	var r ReplicaRequest
	if err := strictjson.Decode(b, &r, maxReplicaMessage); err != nil {
		return nil, fmt.Errorf("decode replica: %w: %v", ErrBadMessage, err)
	}
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("decode replica: %w", err)
	}
	return &r, nil
}

func (r *ReplicaRequest) validate() error {
	sum := sha256.Sum256(r.State)
	switch {
	case r.Version != ProtocolVersion:
		return fmt.Errorf("%w: protocol version %d (this host speaks %d)", ErrBadMessage, r.Version, ProtocolVersion)
	case !txIDRE.MatchString(r.ID):
		return fmt.Errorf("%w: replica id %q", ErrBadMessage, r.ID)
	case !ids.IsHostID(r.Owner) || !ids.IsHostID(r.Standby) || r.Owner == r.Standby:
		return fmt.Errorf("%w: host ids %q -> %q", ErrBadMessage, r.Owner, r.Standby)
	case !ids.IsUUID(r.VM):
		return fmt.Errorf("%w: VM id %q", ErrBadMessage, r.VM)
	case r.Generation == 0 || r.Generation > registry.MaxGeneration:
		return fmt.Errorf("%w: generation %d", ErrBadMessage, r.Generation)
	case len(r.KeyID) != 64 || len(r.EvidenceDigest) != 32:
		return fmt.Errorf("%w: key id or evidence digest", ErrBadMessage)
	case len(r.TransferKey.Public) == 0 || len(r.TransferKey.Duplicate) == 0 || len(r.TransferKey.Seed) == 0:
		return fmt.Errorf("%w: transfer key is incomplete", ErrBadMessage)
	case len(r.Nonce) != 12 || len(r.Ciphertext) != 48:
		return fmt.Errorf("%w: nonce or ciphertext", ErrBadMessage)
	case len(r.State) == 0 || !bytes.Equal(sum[:], r.StateSHA256):
		return fmt.Errorf("%w: the state's SHA-256 differs from the one sent (%d bytes)", ErrBadMessage, len(r.State))
	case len(r.Name) > 256:
		return fmt.Errorf("%w: VM name of %d bytes", ErrBadMessage, len(r.Name))
	case len(r.DomainXML) > maxDomainXML:
		return fmt.Errorf("%w: domain XML of %d bytes", ErrBadMessage, len(r.DomainXML))
	}
	return nil
}

// replicaBinding binds the VM key of a replica to the refresh, the VM, its
// generation, both hosts, the evidence verified and the state sent.
func replicaBinding(r *ReplicaRequest) vtpm.Binding {
	return vtpm.Binding{Domain: vtpm.Domain("vtpmm/replica/v" + strconv.Itoa(ProtocolVersion)), Generation: r.Generation,
		Fields: [][]byte{[]byte(r.ID), []byte(r.VM), []byte(r.Owner), []byte(r.Standby), r.EvidenceDigest, r.StateSHA256}}
}

// keyID names a migration key by its public area.
func keyID(mkPublic []byte) string {
	h := sha256.Sum256(mkPublic)
	return hex.EncodeToString(h[:])
}

// selfFenced refuses to hand out a key while this host's liveness lease
// is gone (rule self-fence): a standby may be taking its VMs over. It
// protects keys, not running VMs (docs/failover.md). The refusal is also
// ErrRegistryUnavailable (exit 6): it lasts until the registry renews the
// lease, so operators and loops retry it as they retry a lost quorum.
func (n *Node) selfFenced(op string) error {
	if ll, ok := n.cfg.Registry.(interface{ LeaseLost() bool }); ok && ll.LeaseLost() {
		return fmt.Errorf("%s: %w: %w: %s's liveness lease is gone: a standby may be taking its VMs over, so it hands out no VM key until the lease is back (rule %s)",
			op, ErrNotOwner, ErrRegistryUnavailable, n.cfg.Host, RuleSelfFence)
	}
	return nil
}

// ReplicaStats is what one replica refresh cost the owner.
type ReplicaStats struct {
	Generation uint64
	Bytes      int  // the message's size
	Warm       bool // the standby's evidence was reused (no Evidence call)
}

// SendReplica sends standby a replica of vm at the generation this host
// holds, with state (the vTPM state at rest). The standby is attested
// (or its fresh evidence reused); a refusal wraps ErrRefused and the
// attest.RefusalError. This host must be the registry's owner at its
// generation and its lease alive.
func (n *Node) SendReplica(ctx context.Context, vm, name, standby string, state []byte) (ReplicaStats, error) {
	op := fmt.Sprintf("replica of %s to %s", vm, standby)
	if err := n.selfFenced(op); err != nil {
		return ReplicaStats{}, err
	}
	if standby == n.cfg.Host {
		return ReplicaStats{}, fmt.Errorf("%s: %w: the standby is this host", op, ErrBadMessage)
	}
	if _, err := n.cfg.Ledger.Holder(vm); err == nil {
		return ReplicaStats{}, fmt.Errorf("%s: %w: an open transaction holds the VM", op, ErrBusy)
	}
	k, gen, err := n.cfg.Keys.Get(ctx, vm)
	if errors.Is(err, vtpm.ErrKeyNotFound) {
		return ReplicaStats{}, fmt.Errorf("%s: %w", op, ErrNotOwner)
	}
	if err != nil {
		return ReplicaStats{}, fmt.Errorf("%s: %w", op, err)
	}
	defer k.Destroy()
	if n.cfg.Registry != nil {
		v := n.cfg.Registry.Cached(vm)
		if rec, ok := v.VMs[vm]; !ok || rec.Owner != n.cfg.Host || rec.Generation != gen {
			return ReplicaStats{}, fmt.Errorf("%s: %w: this host's last view does not show it owning the VM at generation %d (rule %s)", op, ErrNotOwner, gen, RuleReplicaOwner)
		}
	}
	peer, err := n.cfg.Dial(ctx, standby)
	if err != nil {
		return ReplicaStats{}, fmt.Errorf("%s: %w: %w", op, ErrPeer, err)
	}
	rp, ok := peer.(Replicator)
	if !ok {
		return ReplicaStats{}, fmt.Errorf("%s: the agent wire cannot carry replicas", op)
	}
	v, warm, err := n.destEvidence(ctx, peer, standby, &Result{})
	if err != nil {
		if re, ok := asRefusal(err); ok {
			if n.cfg.Metrics != nil {
				n.cfg.Metrics.AttestationRefused(string(re.Rule))
			}
			n.audit(ctx, AuditEvent{Event: audit.EventKeyReleaseRefused, VM: vm, Peer: standby, Rule: string(re.Rule), Detail: "standby replica: " + err.Error()})
		}
		return ReplicaStats{}, fmt.Errorf("%s: %w", op, err)
	}
	req, err := sealReplica(n.cfg.Rand, v, n.cfg.Host, standby, vm, name, gen, k, state)
	if err != nil {
		return ReplicaStats{}, fmt.Errorf("%s: %w", op, err)
	}
	if dd, ok := n.cfg.Hypervisor.(DomainDescriber); ok {
		if doc, err := dd.MigratableDomainXML(ctx, vm); err == nil && len(doc) <= maxDomainXML {
			req.DomainXML = doc // a replica without it still serves a standby that knows the domain
		}
	}
	size := len(req.State) + len(req.DomainXML) + len(req.TransferKey.Public) + len(req.TransferKey.Duplicate) + len(req.TransferKey.Seed) + 256
	if _, err := rp.Replicate(ctx, req); err != nil {
		return ReplicaStats{}, fmt.Errorf("%s: %w", op, err)
	}
	return ReplicaStats{Generation: gen, Bytes: size, Warm: warm}, nil
}

// sealReplica wraps a fresh transfer key for the standby's certified MK
// (software: no TPM) and the VM key under it.
func sealReplica(rnd io.Reader, v verified, owner, standby, vm, name string, gen uint64, k vtpm.VMKey, state []byte) (*ReplicaRequest, error) {
	id, err := newTxID(rnd)
	if err != nil {
		return nil, err
	}
	tk := make([]byte, 32)
	defer wipe(tk)
	if _, err := io.ReadFull(rnd, tk); err != nil {
		return nil, err
	}
	wk, err := identity.Wrap(rnd, v.mkPublic, tk)
	if err != nil {
		return nil, err
	}
	s, err := transferSealer(tk, rnd)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(state)
	req := &ReplicaRequest{Version: ProtocolVersion, ID: id, Owner: owner, Standby: standby, VM: vm, Name: name, Generation: gen,
		KeyID: keyID(v.mkPublic), EvidenceDigest: v.digest, TransferKey: *wk, StateSHA256: sum[:], State: state}
	sk, err := s.SealKey(k, replicaBinding(req))
	if err != nil {
		return nil, err
	}
	req.Nonce, req.Ciphertext = sk.Nonce, sk.Ciphertext
	return req, req.validate()
}

// Replicate is the standby's side of a refresh: it authorises the sender
// (enrolled, the registry's owner at the replica's generation), checks the
// replica is wrapped for this host's migration key, stores it and records
// the standby record at its generation.
func (n *Node) Replicate(ctx context.Context, req *ReplicaRequest) (*ReplicaResponse, error) {
	const call = "replica"
	if err := req.validate(); err != nil {
		return nil, fmt.Errorf("replica: %w", err)
	}
	if req.Standby != n.cfg.Host {
		return nil, fmt.Errorf("replica: %w: addressed to %s, this is %s", ErrBadMessage, req.Standby, n.cfg.Host)
	}
	if n.cfg.Replicas == nil {
		return nil, fmt.Errorf("replica on %s: %w: this host keeps no replicas", n.cfg.Host, ErrRefused)
	}
	if err := n.authorizePeer(ctx, call, req.Owner); err != nil {
		return nil, err
	}
	if n.cfg.Identity != nil && n.cfg.Identity.MK.Public != nil && req.KeyID != keyID(n.cfg.Identity.MK.Public) {
		return nil, deny(call, req.Owner, req.VM, RuleReplicaKey, "the replica is wrapped for key %s, not this host's migration key", req.KeyID)
	}
	if held, err := n.heldGenerations(ctx); err != nil {
		return nil, err
	} else if g, ok := held[req.VM]; ok && g >= req.Generation {
		return nil, deny(call, req.Owner, req.VM, RuleReplicaHeld, "this host holds the VM's key at generation %d", g)
	}
	reg, ok := n.cfg.Registry.(FailoverRegistry)
	if !ok {
		return nil, fmt.Errorf("replica on %s: %w: replicas need the fleet registry", n.cfg.Host, ErrRefused)
	}
	rec, _, err := reg.VMRev(ctx, req.VM)
	if err != nil {
		return nil, fmt.Errorf("replica of %s from %s: %w", req.VM, req.Owner, registryError(err))
	}
	if rec.Owner != req.Owner || rec.Generation != req.Generation {
		return nil, deny(call, req.Owner, req.VM, RuleReplicaOwner, "the registry shows %s at generation %d, not %s at %d", rec.Owner, rec.Generation, req.Owner, req.Generation)
	}
	if txID, err := n.cfg.Ledger.Holder(req.VM); err == nil {
		return nil, fmt.Errorf("replica of %s: %w: transaction %s holds the VM here (a promotion?)", req.VM, ErrBusy, txID)
	}
	prev, _ := n.cfg.Replicas.Get(req.VM)
	size, err := n.cfg.Replicas.Put(&StoredReplica{Request: *req, Received: n.cfg.Now().UTC()})
	if err != nil {
		return nil, fmt.Errorf("replica of %s: %w", req.VM, storageErr(err))
	}
	if err := reg.RefreshStandby(ctx, registry.Standby{VM: req.VM, Host: n.cfg.Host, Generation: req.Generation}); err != nil {
		if errors.Is(err, registry.ErrNotFound) {
			_ = n.cfg.Replicas.Drop(req.VM)
			return nil, deny(call, req.Owner, req.VM, RuleStandbyAssigned, "%s is not assigned as a standby of the VM", n.cfg.Host)
		}
		return nil, fmt.Errorf("replica of %s: %w", req.VM, registryError(err))
	}
	if prev == nil || prev.Request.Generation != req.Generation {
		n.audit(ctx, AuditEvent{Event: audit.EventReplica, VM: req.VM, Peer: req.Owner, Generation: req.Generation,
			Detail: fmt.Sprintf("standby replica stored (%d bytes, key %s)", size, req.KeyID[:16])})
		n.log.WithFields(logrus.Fields{"vm": req.VM, "owner": req.Owner, "generation": req.Generation}).Info("standby replica stored")
	}
	return &ReplicaResponse{VM: req.VM, Generation: req.Generation, Stored: size}, nil
}

// DropReplica removes this host's replica of vm and its standby record's
// generation (the record itself stays when keep is set: the host stays
// assigned). Audited with why.
func (n *Node) DropReplica(ctx context.Context, vm, why string) error {
	if n.cfg.Replicas == nil {
		return nil
	}
	r, err := n.cfg.Replicas.Get(vm)
	if err != nil {
		return nil // none
	}
	if err := n.cfg.Replicas.Drop(vm); err != nil {
		return err
	}
	n.audit(ctx, AuditEvent{Event: audit.EventReplicaDropped, VM: vm, Peer: r.Request.Owner, Generation: r.Request.Generation, Detail: why})
	n.log.WithFields(logrus.Fields{"vm": vm, "generation": r.Request.Generation}).Info("standby replica dropped: " + why)
	return nil
}

// Replicas lists the replicas this host holds.
func (n *Node) Replicas() ([]*StoredReplica, error) {
	if n.cfg.Replicas == nil {
		return nil, nil
	}
	return n.cfg.Replicas.List()
}
