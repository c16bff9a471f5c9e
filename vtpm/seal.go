package vtpm

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
)

// Domain names one use of a sealed VM key. The associated data of every
// sealed key starts with it, so that a key sealed for one use never opens
// for another.
type Domain string

// DomainAtRest is the domain of the envelope at rest (Envelope, format
// version 1). Package migrate defines the transfer envelope's domain.
const DomainAtRest Domain = "vtpmm/vmkey"

// Binding is what a sealed VM key is bound to (its AEAD associated data):
// a domain, fields, and the key's generation.
type Binding struct {
	Domain     Domain
	Fields     [][]byte
	Generation uint64
}

// AssociatedData encodes the binding: the domain, then each field as a
// big-endian uint16 length and its bytes, then the generation as a
// big-endian uint64. No two bindings share an encoding.
func (b Binding) AssociatedData() []byte {
	var buf bytes.Buffer
	buf.WriteString(string(b.Domain))
	for _, f := range b.Fields {
		_ = binary.Write(&buf, binary.BigEndian, uint16(len(f)))
		buf.Write(f)
	}
	_ = binary.Write(&buf, binary.BigEndian, b.Generation)
	return buf.Bytes()
}

// Sealed is a VM key sealed by a Sealer.
type Sealed struct {
	Nonce, Ciphertext []byte
}

// Sealer seals VM keys under a key it holds and never reveals (go-kms-
// wrapping's Wrapper, for one kind of plaintext). The vault implements it
// for the envelope at rest; NewAEADSealer makes one for the transfer key
// of a migration. The plaintext key never leaves this package.
type Sealer interface {
	// SealKey seals k, bound to b.
	SealKey(k VMKey, b Binding) (Sealed, error)
	// OpenKey opens a key sealed for the same binding; a key sealed for
	// another binding, or under another key, gives ErrWrongKey.
	OpenKey(s Sealed, b Binding) (VMKey, error)
}

var (
	_ Sealer = (*Vault)(nil)
	_ Sealer = (*aeadSealer)(nil)
)

// aeadSealer seals with AES-256-GCM and random nonces.
type aeadSealer struct {
	aead cipher.AEAD
	rand io.Reader
}

// NewAEADSealer returns a Sealer under a 32-byte key (AES-256-GCM, random
// nonces from rnd, crypto/rand when nil). The key is copied into the
// cipher: the caller wipes its own copy.
func NewAEADSealer(key []byte, rnd io.Reader) (Sealer, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("sealer: %w: key of %d bytes, want 32", ErrWrongKey, len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	if rnd == nil {
		rnd = rand.Reader
	}
	return &aeadSealer{aead: aead, rand: rnd}, nil
}

func (s *aeadSealer) SealKey(k VMKey, b Binding) (Sealed, error) {
	return sealKey(s.aead, s.rand, k, b)
}

func (s *aeadSealer) OpenKey(sk Sealed, b Binding) (VMKey, error) {
	return openKey(s.aead, sk, b)
}

func sealKey(aead cipher.AEAD, rnd io.Reader, k VMKey, b Binding) (Sealed, error) {
	if !k.Valid() {
		return Sealed{}, fmt.Errorf("seal VM key: empty key")
	}
	if b.Domain == "" {
		return Sealed{}, fmt.Errorf("seal VM key: binding without a domain")
	}
	nonce := make([]byte, aead.NonceSize())
	if _, err := io.ReadFull(rnd, nonce); err != nil {
		return Sealed{}, fmt.Errorf("seal VM key: %w", err)
	}
	return Sealed{Nonce: nonce, Ciphertext: aead.Seal(nil, nonce, k.k[:], b.AssociatedData())}, nil
}

func openKey(aead cipher.AEAD, s Sealed, b Binding) (VMKey, error) {
	if len(s.Nonce) != aead.NonceSize() {
		return VMKey{}, fmt.Errorf("open VM key: %w: nonce length %d", ErrCorrupt, len(s.Nonce))
	}
	pt, err := aead.Open(nil, s.Nonce, s.Ciphertext, b.AssociatedData())
	if err != nil {
		return VMKey{}, fmt.Errorf("open VM key: %w: authentication failed", ErrWrongKey)
	}
	sk, err := secretFromBytes(pt)
	if err != nil {
		return VMKey{}, err
	}
	return VMKey{k: sk}, nil
}

// SealKey seals k under the vault key (Sealer).
func (v *Vault) SealKey(k VMKey, b Binding) (Sealed, error) {
	aead, err := v.envelopeAEAD()
	if err != nil {
		return Sealed{}, fmt.Errorf("seal VM key: %w", err)
	}
	return sealKey(aead, rand.Reader, k, b)
}

// OpenKey opens a key the vault sealed (Sealer). No TPM command: the vault
// key is in memory.
func (v *Vault) OpenKey(s Sealed, b Binding) (VMKey, error) {
	aead, err := v.envelopeAEAD()
	if err != nil {
		return VMKey{}, fmt.Errorf("open VM key: %w", err)
	}
	return openKey(aead, s, b)
}
