package migrate

import (
	"encoding/json"
	"fmt"
	"regexp"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/internal/ids"
	"github.com/vtpmm/vtpmm/internal/strictjson"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// ProtocolVersion is the version of the messages below.
const ProtocolVersion = 1

// maxMessage bounds every decoded message (a batch of 1000 VMs is ~250 KiB;
// evidence with an event log is larger and has its own limit in attest).
const maxMessage = 4 << 20

// EvidenceRequest asks the destination for evidence over the source's nonce.
type EvidenceRequest struct {
	Version int                   `json:"version"`
	Nonce   []byte                `json:"nonce"`
	PCRs    map[attest.Bank][]int `json:"pcrs,omitempty"` // what the source's policy checks
	Source  string                `json:"source"`
}

// EvidenceResponse carries the encoded attest.Evidence.
type EvidenceResponse struct {
	Evidence json.RawMessage `json:"evidence"`
}

// WrappedVM is one VM key under the batch's transfer key.
type WrappedVM struct {
	UUID       string `json:"uuid"`
	Name       string `json:"name,omitempty"`
	Generation uint64 `json:"generation"` // the generation the destination will hold
	Nonce      []byte `json:"nonce"`
	Ciphertext []byte `json:"ct"`
}

// PrepareRequest hands a batch of VM keys to the destination. The transfer
// key is wrapped once for the destination's MK; every VM key travels under
// it, bound (AEAD data) to the transaction, VM, generation, both hosts and
// the digest of the evidence the source verified.
type PrepareRequest struct {
	Version        int                 `json:"version"`
	TxID           string              `json:"tx"`
	Source         string              `json:"source"`
	Dest           string              `json:"dest"`
	EvidenceDigest []byte              `json:"evidence_digest"`
	TransferKey    identity.WrappedKey `json:"transfer_key"`
	VMs            []WrappedVM         `json:"vms"`
	// RegistryRev is the fleet registry's revision at the source's Begin
	// (0 in registry mode none): the destination's last view, once it has
	// reached it, shows the batch open without a read.
	RegistryRev int64 `json:"registry_rev,omitempty"`
	// KeyOnly marks a move of the keys alone (reunite.go): the VMs'
	// domains and vTPM states are on the destination already, shut off,
	// and no hypervisor migration follows.
	KeyOnly bool `json:"key_only,omitempty"`
}

// PrepareResponse acknowledges that every VM's key is PENDING and its
// secret defined on the destination's hypervisor. Proofs holds, per VM, a
// keyed proof (KeyProofLabel) computed from the key the destination
// defined: the source checks it against its own key before the hypervisor
// migrates, so a destination holding another key is refused before any
// memory moves (libvirt would only fail late).
type PrepareResponse struct {
	TxID     string            `json:"tx"`
	Accepted []string          `json:"accepted"`
	Proofs   map[string][]byte `json:"proofs"`
}

// KeyProofLabel is what a key proof authenticates: the transaction, the VM
// and its new generation.
func KeyProofLabel(txID, vm string, gen uint64) []byte {
	return fmt.Appendf(nil, "vtpmm/key-proof/v%d|%s|%s|%d", ProtocolVersion, txID, vm, gen)
}

// FinishRequest commits or aborts, per VM.
type FinishRequest struct {
	Version int      `json:"version"`
	TxID    string   `json:"tx"`
	Source  string   `json:"source"`
	Commit  []string `json:"commit,omitempty"`
	Abort   []string `json:"abort,omitempty"`
	// RegistryRev is the fleet registry's revision at the source's Commit
	// (0 in registry mode none): the destination promotes its keys only
	// once the registry shows it as the owner, and its last view shows
	// that without a read once it has reached this revision.
	RegistryRev int64 `json:"registry_rev,omitempty"`
}

// FinishResponse reports the destination's final state.
type FinishResponse struct {
	TxID      string   `json:"tx"`
	State     TxState  `json:"state"`
	Committed []string `json:"committed,omitempty"`
	Aborted   []string `json:"aborted,omitempty"`
}

// StatusRequest asks a peer about a transaction, for recovery.
type StatusRequest struct {
	TxID string   `json:"tx"`
	VMs  []string `json:"vms,omitempty"`
	From string   `json:"from"` // the asking host: the transaction's peer on the answering host
}

// StatusResponse is a peer's view: its ledger state (empty if unknown) and
// which of the VMs its hypervisor runs.
type StatusResponse struct {
	TxID    string   `json:"tx"`
	Known   bool     `json:"known"`
	State   TxState  `json:"state,omitempty"`
	Running []string `json:"running,omitempty"`
	// Held is the generation of the active key this host holds for each
	// of the VMs asked about (absent: none). A host whose copy the
	// registry shows stale shreds it only once the registry's owner
	// confirms here that it holds the newer generation.
	Held map[string]uint64 `json:"held,omitempty"`
	// Stopped lists the VMs whose domain is defined on this host but does
	// not run: their vTPM state is on this host's disk. For a known
	// transaction, of its VMs; for an unknown one, of the VMs asked about
	// of which this host holds no key (a source whose destination lost its
	// ledger learns where the VM's domain is: reunite.go).
	Stopped []string `json:"stopped,omitempty"`
}

var txIDRE = regexp.MustCompile(`^[0-9a-f]{32}$`)

// decodeStrict decodes one message (internal/strictjson): size-limited, no
// unknown fields, no trailing data. Errors wrap ErrBadMessage.
func decodeStrict(b []byte, v any) error {
	if err := strictjson.Decode(b, v, maxMessage); err != nil {
		return fmt.Errorf("%w: %v", ErrBadMessage, err)
	}
	return nil
}

// DecodeStrict decodes a message that has no decoder of its own below
// (Evidence, Status, Identity, Activate requests) with the same rules.
func DecodeStrict[T any](what string, b []byte) (*T, error) {
	var v T
	if err := decodeStrict(b, &v); err != nil {
		return nil, fmt.Errorf("decode %s: %w", what, err)
	}
	return &v, nil
}

// DecodePrepare decodes and validates a PrepareRequest (untrusted input).
func DecodePrepare(b []byte) (*PrepareRequest, error) {
	var r PrepareRequest
	if err := decodeStrict(b, &r); err != nil {
		return nil, fmt.Errorf("decode prepare: %w", err)
	}
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("decode prepare: %w", err)
	}
	return &r, nil
}

func (r *PrepareRequest) validate() error {
	switch {
	case r.Version != ProtocolVersion:
		return fmt.Errorf("%w: protocol version %d (this host speaks %d)", ErrBadMessage, r.Version, ProtocolVersion)
	case !txIDRE.MatchString(r.TxID):
		return fmt.Errorf("%w: transaction id %q", ErrBadMessage, r.TxID)
	case !ids.IsHostID(r.Source) || !ids.IsHostID(r.Dest):
		return fmt.Errorf("%w: host ids %q -> %q", ErrBadMessage, r.Source, r.Dest)
	case len(r.EvidenceDigest) != 32:
		return fmt.Errorf("%w: evidence digest of %d bytes", ErrBadMessage, len(r.EvidenceDigest))
	case len(r.TransferKey.Public) == 0 || len(r.TransferKey.Duplicate) == 0 || len(r.TransferKey.Seed) == 0:
		return fmt.Errorf("%w: transfer key is incomplete", ErrBadMessage)
	case len(r.VMs) == 0 || len(r.VMs) > 4096:
		return fmt.Errorf("%w: %d VMs in one batch (1..4096)", ErrBadMessage, len(r.VMs))
	case r.RegistryRev < 0:
		return fmt.Errorf("%w: registry revision %d", ErrBadMessage, r.RegistryRev)
	}
	seen := map[string]bool{}
	for _, vm := range r.VMs {
		switch {
		case !ids.IsUUID(vm.UUID):
			return fmt.Errorf("%w: VM id %q", ErrBadMessage, vm.UUID)
		case seen[vm.UUID]:
			return fmt.Errorf("%w: VM %s twice in one batch", ErrBadMessage, vm.UUID)
		case vm.Generation == 0 || len(vm.Nonce) != 12 || len(vm.Ciphertext) != 48:
			return fmt.Errorf("%w: VM %s: generation, nonce or ciphertext", ErrBadMessage, vm.UUID)
		}
		seen[vm.UUID] = true
	}
	return nil
}

// DecodeFinish decodes and validates a FinishRequest (untrusted input).
func DecodeFinish(b []byte) (*FinishRequest, error) {
	var r FinishRequest
	if err := decodeStrict(b, &r); err != nil {
		return nil, fmt.Errorf("decode finish: %w", err)
	}
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("decode finish: %w", err)
	}
	return &r, nil
}

func (r *FinishRequest) validate() error {
	if r.Version != ProtocolVersion || !txIDRE.MatchString(r.TxID) || !ids.IsHostID(r.Source) || r.RegistryRev < 0 {
		return fmt.Errorf("%w: version, transaction id, source or registry revision", ErrBadMessage)
	}
	for _, id := range append(append([]string{}, r.Commit...), r.Abort...) {
		if !ids.IsUUID(id) {
			return fmt.Errorf("%w: VM id %q", ErrBadMessage, id)
		}
	}
	return nil
}
