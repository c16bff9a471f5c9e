package vtpm

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"strings"
)

// EnvelopeVersion is the format version of a VM key envelope.
const EnvelopeVersion = 1

const maxEnvelope = 4096

// uuidRE matches a canonical lowercase UUID.
var uuidRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// CheckVMID returns ErrBadVMID unless id is a canonical lowercase UUID.
func CheckVMID(id string) error {
	if !uuidRE.MatchString(id) {
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

// additionalData is the AEAD associated data: length-prefixed fields, so no
// two different headers share an encoding.
func (e *Envelope) additionalData() []byte {
	var b bytes.Buffer
	b.WriteString("vtpmm/vmkey")
	for _, f := range []string{fmt.Sprint(e.Version), e.KeyID, e.HostID, e.VMID} {
		_ = binary.Write(&b, binary.BigEndian, uint16(len(f)))
		b.WriteString(f)
	}
	_ = binary.Write(&b, binary.BigEndian, e.Generation)
	return b.Bytes()
}

// SealVMKey encrypts a VM key under the vault.
func (v *Vault) SealVMKey(hostID, vmID string, gen uint64, k VMKey) (*Envelope, error) {
	aead, err := v.envelopeAEAD()
	if err != nil {
		return nil, fmt.Errorf("seal VM key: %w", err)
	}
	if err := CheckVMID(vmID); err != nil {
		return nil, fmt.Errorf("seal VM key: %w", err)
	}
	if !k.Valid() {
		return nil, fmt.Errorf("seal VM key: empty key")
	}
	e := &Envelope{Version: EnvelopeVersion, KeyID: v.keyID, HostID: hostID, VMID: vmID, Generation: gen,
		Nonce: make([]byte, aead.NonceSize())}
	if _, err := io.ReadFull(rand.Reader, e.Nonce); err != nil {
		return nil, fmt.Errorf("seal VM key: %w", err)
	}
	e.Ciphertext = aead.Seal(nil, e.Nonce, k.k[:], e.additionalData())
	return e, nil
}

// OpenVMKey decrypts an envelope. It costs no TPM command: the vault key
// is already in memory. An envelope made by another vault, or bound to
// another host, VM or generation, yields ErrWrongKey naming the mismatch.
func (v *Vault) OpenVMKey(e *Envelope, hostID, vmID string) (VMKey, error) {
	aead, err := v.envelopeAEAD()
	if err != nil {
		return VMKey{}, fmt.Errorf("open VM key: %w", err)
	}
	switch {
	case e.KeyID != v.keyID:
		return VMKey{}, fmt.Errorf("open VM key %s: %w: made by vault key %s, this host's vault key is %s", vmID, ErrWrongKey, e.KeyID, v.keyID)
	case e.HostID != hostID:
		return VMKey{}, fmt.Errorf("open VM key %s: %w: bound to host %q, this is host %q", vmID, ErrWrongKey, e.HostID, hostID)
	case e.VMID != vmID:
		return VMKey{}, fmt.Errorf("open VM key %s: %w: bound to VM %s", vmID, ErrWrongKey, e.VMID)
	case len(e.Nonce) != aead.NonceSize():
		return VMKey{}, fmt.Errorf("open VM key %s: %w: nonce length %d", vmID, ErrCorrupt, len(e.Nonce))
	}
	pt, err := aead.Open(nil, e.Nonce, e.Ciphertext, e.additionalData())
	if err != nil {
		return VMKey{}, fmt.Errorf("open VM key %s: %w: authentication failed (tampered envelope, or generation %d is not the one it was sealed for)", vmID, ErrCorrupt, e.Generation)
	}
	s, err := secretFromBytes(pt)
	if err != nil {
		return VMKey{}, fmt.Errorf("open VM key %s: %w", vmID, err)
	}
	return VMKey{k: s}, nil
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
	if len(b) > maxEnvelope {
		return nil, fmt.Errorf("decode envelope: %w: %d bytes", ErrCorrupt, len(b))
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var e Envelope
	if err := dec.Decode(&e); err != nil {
		return nil, fmt.Errorf("decode envelope: %w: %v", ErrCorrupt, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("decode envelope: %w: trailing data", ErrCorrupt)
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
