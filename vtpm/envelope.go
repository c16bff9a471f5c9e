package vtpm

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/vtpmm/vtpmm/internal/ids"
	"github.com/vtpmm/vtpmm/internal/strictjson"
)

// EnvelopeVersion is the format version of a VM key envelope.
const EnvelopeVersion = 1

const maxEnvelope = 4096

// CheckVMID returns ErrBadVMID unless id is a canonical lowercase UUID.
func CheckVMID(id string) error {
	if !ids.IsUUID(id) {
		return fmt.Errorf("%w: %q", ErrBadVMID, id)
	}
	return nil
}

// Envelope is a VM key at rest: AES-256-GCM under a key derived from the
// vault key. The associated data binds the format version, the vault key
// ID, the host ID, the VM UUID and the generation, so an envelope cannot be
// replayed for another VM, host or generation.
type Envelope struct {
	Version    int    `json:"v"`
	KeyID      string `json:"kid"`
	HostID     string `json:"host"`
	VMID       string `json:"vm"`
	Generation uint64 `json:"gen"`
	Nonce      []byte `json:"nonce"`
	Ciphertext []byte `json:"ct"`
}

// binding is what the envelope's key is bound to (DomainAtRest): the
// format version, the vault key ID, the host ID, the VM UUID and the
// generation.
func (e *Envelope) binding() Binding {
	return Binding{Domain: DomainAtRest, Generation: e.Generation,
		Fields: [][]byte{[]byte(fmt.Sprint(e.Version)), []byte(e.KeyID), []byte(e.HostID), []byte(e.VMID)}}
}

// SealVMKey encrypts a VM key under the vault, as an envelope.
func (v *Vault) SealVMKey(hostID, vmID string, gen uint64, k VMKey) (*Envelope, error) {
	if err := CheckVMID(vmID); err != nil {
		return nil, fmt.Errorf("seal VM key: %w", err)
	}
	e := &Envelope{Version: EnvelopeVersion, KeyID: v.keyID, HostID: hostID, VMID: vmID, Generation: gen}
	s, err := v.SealKey(k, e.binding())
	if err != nil {
		return nil, err
	}
	e.Nonce, e.Ciphertext = s.Nonce, s.Ciphertext
	return e, nil
}

// OpenVMKey decrypts an envelope. It costs no TPM command: the vault key
// is already in memory. An envelope made by another vault, or bound to
// another host, VM or generation, yields ErrWrongKey naming the mismatch.
func (v *Vault) OpenVMKey(e *Envelope, hostID, vmID string) (VMKey, error) {
	if _, err := v.envelopeAEAD(); err != nil {
		return VMKey{}, fmt.Errorf("open VM key: %w", err)
	}
	switch {
	case e.KeyID != v.keyID:
		return VMKey{}, fmt.Errorf("open VM key %s: %w: made by vault key %s, this host's vault key is %s", vmID, ErrWrongKey, e.KeyID, v.keyID)
	case e.HostID != hostID:
		return VMKey{}, fmt.Errorf("open VM key %s: %w: bound to host %q, this is host %q", vmID, ErrWrongKey, e.HostID, hostID)
	case e.VMID != vmID:
		return VMKey{}, fmt.Errorf("open VM key %s: %w: bound to VM %s", vmID, ErrWrongKey, e.VMID)
	}
	k, err := v.OpenKey(Sealed{Nonce: e.Nonce, Ciphertext: e.Ciphertext}, e.binding())
	if errors.Is(err, ErrWrongKey) {
		return VMKey{}, fmt.Errorf("open VM key %s: %w: authentication failed (tampered envelope, or generation %d is not the one it was sealed for)", vmID, ErrCorrupt, e.Generation)
	}
	if err != nil {
		return VMKey{}, fmt.Errorf("open VM key %s: %w", vmID, err)
	}
	return k, nil
}

// MarshalEnvelope encodes an envelope for storage.
func MarshalEnvelope(e *Envelope) ([]byte, error) {
	b, err := json.Marshal(e)
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// UnmarshalEnvelope decodes and validates an envelope. Input is untrusted:
// it is size-limited, unknown fields are refused and every field is checked.
func UnmarshalEnvelope(b []byte) (*Envelope, error) {
	var e Envelope
	if err := strictjson.Decode(b, &e, maxEnvelope); err != nil {
		return nil, fmt.Errorf("decode envelope: %w: %v", ErrCorrupt, err)
	}
	if e.Version != EnvelopeVersion {
		return nil, fmt.Errorf("decode envelope: %w: version %d (this build reads %d)", ErrUnsupportedVersion, e.Version, EnvelopeVersion)
	}
	if err := CheckVMID(e.VMID); err != nil {
		return nil, fmt.Errorf("decode envelope: %w: %w", ErrCorrupt, err)
	}
	if len(e.KeyID) != 16 || strings.Trim(e.KeyID, "0123456789abcdef") != "" {
		return nil, fmt.Errorf("decode envelope: %w: key id %q", ErrCorrupt, e.KeyID)
	}
	if e.HostID == "" || len(e.Nonce) == 0 || len(e.Ciphertext) != 32+16 {
		return nil, fmt.Errorf("decode envelope: %w: missing host, nonce or ciphertext", ErrCorrupt)
	}
	return &e, nil
}
