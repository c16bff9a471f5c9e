package vtpm

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"strings"
)

// secret32 is 32 bytes of key material. It is always handled by pointer so
// that copies are not scattered through memory, and wiped when done.
type secret32 [32]byte

// newSecret32 draws 32 bytes from r (crypto/rand when r is nil).
func newSecret32(r io.Reader) (*secret32, error) {
	if r == nil {
		r = rand.Reader
	}
	var s secret32
	if _, err := io.ReadFull(r, s[:]); err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	return &s, nil
}

func secretFromBytes(b []byte) (*secret32, error) {
	defer wipe(b)
	if len(b) != 32 {
		return nil, fmt.Errorf("%w: sealed key has %d bytes, want 32", ErrCorrupt, len(b))
	}
	var s secret32
	copy(s[:], b)
	return &s, nil
}

func (s *secret32) wipe() { wipe(s[:]) }

func wipe(b []byte) {
	for i := range b {
		b[i] = 0
	}
}

func newEnvelopeAEAD(vaultKey *secret32) (cipher.AEAD, error) {
	k, err := hkdf.Key(sha256.New, vaultKey[:], nil, "vtpmm vm-key envelope v1", 32)
	if err != nil {
		return nil, err
	}
	defer wipe(k)
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// redacted is what every secret type prints.
const redacted = "[REDACTED]"

// VMKey is a VM's 32-byte vTPM state key in plaintext. It refuses to be
// printed or marshalled; the only way out is WithPassphrase, which lends
// the bytes handed to libvirt and swtpm to a function and wipes them.
type VMKey struct {
	k *secret32
}

// NewVMKey generates a random VM key from r (crypto/rand when nil).
func NewVMKey(r io.Reader) (VMKey, error) {
	s, err := newSecret32(r)
	if err != nil {
		return VMKey{}, err
	}
	return VMKey{k: s}, nil
}

// Valid reports whether the key holds material (not zero value, not destroyed).
func (k VMKey) Valid() bool { return k.k != nil }

// passphrase is the key as libvirt's vTPM secret value and swtpm's pwdfd
// input: 64 lowercase hex characters. swtpm derives its AES-256-CBC key
// from it with PBKDF2, for the state at rest (--key) and in the migration
// stream (--migration-key).
func (k VMKey) passphrase() []byte {
	if k.k == nil {
		return nil
	}
	out := make([]byte, hex.EncodedLen(32))
	hex.Encode(out, k.k[:])
	return out
}

// WithPassphrase hands fn the key's passphrase (the bytes libvirt and
// swtpm get) and wipes it when fn returns. fn must not keep it.
func (k VMKey) WithPassphrase(fn func(pass []byte) error) error {
	if k.k == nil {
		return fmt.Errorf("passphrase: empty key")
	}
	pass := k.passphrase()
	defer wipe(pass)
	return fn(pass)
}

// Equal compares two keys in constant time.
func (k VMKey) Equal(o VMKey) bool {
	if k.k == nil || o.k == nil {
		return false
	}
	var d byte
	for i := range k.k {
		d |= k.k[i] ^ o.k[i]
	}
	return d == 0
}

// Destroy wipes the key from memory.
func (k VMKey) Destroy() {
	if k.k != nil {
		k.k.wipe()
	}
}

func (VMKey) String() string                 { return "VMKey" + redacted }
func (VMKey) GoString() string               { return "VMKey" + redacted }
func (k VMKey) Format(f fmt.State, _ rune)   { _, _ = io.WriteString(f, k.String()) }
func (VMKey) MarshalJSON() ([]byte, error)   { return nil, ErrSecretMarshal }
func (VMKey) MarshalText() ([]byte, error)   { return nil, ErrSecretMarshal }
func (VMKey) MarshalBinary() ([]byte, error) { return nil, ErrSecretMarshal }
func (VMKey) MarshalYAML() (any, error)      { return nil, ErrSecretMarshal }
func (VMKey) GobEncode() ([]byte, error)     { return nil, ErrSecretMarshal }

// RecoveryKey opens the vault on its own TPM when the PCRs no longer match.
// It is shown once, to the operator, by 'vtpmd init'; vtpmm never stores it.
type RecoveryKey struct {
	k *secret32
}

// NewRecoveryKey generates a random recovery key from r (crypto/rand when nil).
func NewRecoveryKey(r io.Reader) (*RecoveryKey, error) {
	s, err := newSecret32(r)
	if err != nil {
		return nil, err
	}
	return &RecoveryKey{k: s}, nil
}

// ParseRecoveryKey parses the form printed by Reveal (dashes and spaces ignored).
func ParseRecoveryKey(s string) (*RecoveryKey, error) {
	clean := strings.NewReplacer("-", "", " ", "", "\n", "", "\t", "").Replace(s)
	b, err := hex.DecodeString(clean)
	if err != nil || len(b) != 32 {
		wipe(b)
		return nil, fmt.Errorf("parse recovery key: %w: want 64 hex digits in groups of 8", ErrRecoveryKey)
	}
	sk, err := secretFromBytes(b)
	if err != nil {
		return nil, err
	}
	return &RecoveryKey{k: sk}, nil
}

// Reveal returns the key for the operator to write down: 8 groups of 8 hex digits.
func (r *RecoveryKey) Reveal() string {
	h := hex.EncodeToString(r.k[:])
	parts := make([]string, 0, 8)
	for i := 0; i < len(h); i += 8 {
		parts = append(parts, h[i:i+8])
	}
	return strings.Join(parts, "-")
}

func (r *RecoveryKey) authValue(scheme string) []byte { return recoveryAuthValue(r.k[:], scheme) }

// Destroy wipes the key from memory.
func (r *RecoveryKey) Destroy() { r.k.wipe() }

func (*RecoveryKey) String() string               { return "RecoveryKey" + redacted }
func (*RecoveryKey) GoString() string             { return "RecoveryKey" + redacted }
func (r *RecoveryKey) Format(f fmt.State, _ rune) { _, _ = io.WriteString(f, r.String()) }
func (*RecoveryKey) MarshalJSON() ([]byte, error) { return nil, ErrSecretMarshal }
func (*RecoveryKey) MarshalText() ([]byte, error) { return nil, ErrSecretMarshal }

// Proof returns HMAC-SHA256 of label under a key derived from the VM key:
// two hosts compare proofs to show they hold the same key without
// revealing it.
func (k VMKey) Proof(label []byte) ([]byte, error) {
	if k.k == nil {
		return nil, fmt.Errorf("key proof: empty key")
	}
	pk, err := hkdf.Key(sha256.New, k.k[:], nil, "vtpmm key proof v1", 32)
	if err != nil {
		return nil, err
	}
	defer wipe(pk)
	m := hmac.New(sha256.New, pk)
	m.Write(label)
	return m.Sum(nil), nil
}
