package escrow

import (
	"bytes"
	"context"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"time"

	"filippo.io/age"
	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/vtpm"
)

// Contents is what one bundle holds besides the VM key.
type Contents struct {
	VM         VM
	Generation uint64 // the VM's current generation on the source
	SourceHost string
	VaultKeyID string // the source vault's key ID; metadata, "" if unknown
	State      []byte // the vTPM state blob, already encrypted under the VM key; opaque here
}

// SealerOptions injects the sealer's randomness, clock and logger.
type SealerOptions struct {
	Rand io.Reader          // bundle key, bundle ID, polynomial, nonce; nil: crypto/rand
	Now  func() time.Time   // nil: time.Now
	Log  logrus.FieldLogger // nil: no logging
}

// Sealer seals bundles under one policy. It holds no key and touches no
// TPM: the caller hands it each VM key, which the source opened from its
// vault in memory. Safe for concurrent use when its Rand is.
type Sealer struct {
	policy *Policy
	rand   io.Reader
	now    func() time.Time
	log    logrus.FieldLogger
}

// NewSealer returns a sealer for policy p.
func NewSealer(p *Policy, opts SealerOptions) (*Sealer, error) {
	if p == nil || len(p.custodians) == 0 {
		return nil, fmt.Errorf("escrow sealer: %w: no policy", ErrBadPolicy)
	}
	s := &Sealer{policy: p, rand: opts.Rand, now: opts.Now, log: opts.Log}
	if s.rand == nil {
		s.rand = rand.Reader
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.log == nil {
		l := logrus.New()
		l.Out = io.Discard
		s.log = l
	}
	return s, nil
}

func (c *Contents) validate() error {
	switch {
	case vtpm.CheckVMID(c.VM.UUID) != nil:
		return fmt.Errorf("%w: VM UUID %q is not a canonical UUID", ErrBadRequest, c.VM.UUID)
	case !validText(c.VM.Name, maxVMName):
		return fmt.Errorf("%w: VM name must be 1..%d bytes of printable UTF-8", ErrBadRequest, maxVMName)
	case c.Generation == 0:
		return fmt.Errorf("%w: generation 0", ErrBadRequest)
	case !hostIDRE.MatchString(c.SourceHost):
		return fmt.Errorf("%w: source host %q", ErrBadRequest, c.SourceHost)
	case c.VaultKeyID != "" && !hex16RE.MatchString(c.VaultKeyID):
		return fmt.Errorf("%w: vault key id %q (want 16 hex digits)", ErrBadRequest, c.VaultKeyID)
	case len(c.State) > MaxState:
		return fmt.Errorf("%w: state of %d bytes (limit %d)", ErrBadRequest, len(c.State), MaxState)
	}
	return nil
}

// Seal makes one VM's bundle: a fresh 32-byte bundle key is split k of n,
// each share age-encrypted to its custodian, and the VM key sealed under
// the bundle key with every header byte as associated data. key stays the
// caller's (Seal neither keeps nor destroys it); the bundle key and the
// plaintext shares are wiped before Seal returns. Nothing is written
// anywhere: the caller stores the returned bytes (Writer does it
// atomically).
func (s *Sealer) Seal(ctx context.Context, c Contents, key vtpm.VMKey) ([]byte, error) {
	if err := c.validate(); err != nil {
		return nil, fmt.Errorf("seal bundle: %w", err)
	}
	if !key.Valid() {
		return nil, fmt.Errorf("seal bundle of %s: %w: empty VM key", c.VM.UUID, ErrBadRequest)
	}
	p := s.policy
	id := make([]byte, idBytes)
	bk := make([]byte, 32)
	defer clear(bk)
	if _, err := io.ReadFull(s.rand, id); err != nil {
		return nil, fmt.Errorf("seal bundle: %w", err)
	}
	if _, err := io.ReadFull(s.rand, bk); err != nil {
		return nil, fmt.Errorf("seal bundle: %w", err)
	}
	shares, err := s.split(bk)
	if err != nil {
		return nil, fmt.Errorf("seal bundle of %s: %w", c.VM.UUID, err)
	}
	defer func() {
		for _, sh := range shares {
			clear(sh.y)
		}
	}()

	state := sha256.Sum256(c.State)
	h := Header{
		Version: Version, ID: hex.EncodeToString(id), VM: c.VM, Generation: c.Generation,
		Created: s.now().UTC().Round(0), SourceHost: c.SourceHost, VaultKeyID: c.VaultKeyID,
		Threshold: p.threshold, N: len(p.custodians), Scheme: schemeShamir, Cipher: cipherAES256GCM,
		State: StateInfo{Size: int64(len(c.State)), SHA256: hex.EncodeToString(state[:])},
	}
	if p.threshold == 1 {
		h.Scheme = schemeSingle
	}
	files := make([][]byte, len(p.custodians))
	for i, cu := range p.custodians {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("seal bundle of %s: %w", c.VM.UUID, err)
		}
		ct, err := encryptShare(cu, sharePlaintext(id, shares[i].x, shares[i].y))
		if err != nil {
			return nil, fmt.Errorf("seal bundle of %s: custodian %s: %w", c.VM.UUID, cu.Name, err)
		}
		files[i] = ct
		cs := CustodianShare{Name: cu.Name, X: int(shares[i].x), ShareSize: len(ct), ShareSHA256: digestHex(ct)}
		for _, r := range cu.Recipients {
			cs.Recipients = append(cs.Recipients, RecipientLabel{Kind: r.kind, Fingerprint: r.Fingerprint()})
		}
		h.Custodians = append(h.Custodians, cs)
	}
	hdr, err := encodeHeader(&h)
	if err != nil {
		return nil, err
	}
	ad := framePrefix(hdr)
	sealer, err := bundleSealer(bk, id, s.rand)
	if err != nil {
		return nil, fmt.Errorf("seal bundle: %w", err)
	}
	sk, err := sealer.SealKey(key, keyBinding(ad, c.Generation))
	if err != nil {
		return nil, fmt.Errorf("seal bundle of %s: %w", c.VM.UUID, err)
	}
	if len(sk.Nonce) != nonceSize || len(sk.Ciphertext) != sealedKeySize {
		return nil, fmt.Errorf("seal bundle of %s: sealed key of unexpected size", c.VM.UUID)
	}
	nonce, sealed := sk.Nonce, sk.Ciphertext
	size := len(ad) + nonceSize + len(sealed) + 8 + len(c.State)
	for _, f := range files {
		size += 4 + len(f)
	}
	out := make([]byte, 0, size)
	out = append(out, ad...)
	for _, f := range files {
		out = binary.BigEndian.AppendUint32(out, uint32(len(f)))
		out = append(out, f...)
	}
	out = append(out, nonce...)
	out = append(out, sealed...)
	out = binary.BigEndian.AppendUint64(out, uint64(len(c.State)))
	out = append(out, c.State...)
	s.log.WithFields(logrus.Fields{"vm": c.VM.UUID, "gen": c.Generation, "bundle": h.ID, "k": h.Threshold, "n": h.N, "bytes": len(out)}).Debug("escrow bundle sealed")
	return out, nil
}

// split returns the n shares of the bundle key: Shamir for k >= 2; for
// k = 1 every custodian gets the bundle key itself.
func (s *Sealer) split(bk []byte) ([]share, error) {
	n, k := len(s.policy.custodians), s.policy.threshold
	if k >= 2 {
		return splitSecret(s.rand, bk, n, k)
	}
	out := make([]share, n)
	for i := range out {
		out[i] = share{x: byte(i + 1), y: bytes.Clone(bk)}
	}
	return out, nil
}

// encryptShare encrypts one share to every recipient of a custodian, as a
// binary age file, and wipes the plaintext.
func encryptShare(c Custodian, pt []byte) ([]byte, error) {
	defer clear(pt)
	rs := make([]age.Recipient, len(c.Recipients))
	plugins := false
	for i, r := range c.Recipients {
		rs[i] = r.r
		plugins = plugins || r.kind.Plugin() != ""
	}
	var buf bytes.Buffer
	w, err := age.Encrypt(&buf, rs...)
	if err == nil {
		if _, err = w.Write(pt); err == nil {
			err = w.Close()
		}
	}
	if err != nil {
		if plugins {
			return nil, fmt.Errorf("%w: %w", ErrPlugin, err)
		}
		return nil, fmt.Errorf("age encrypt: %w", err)
	}
	if buf.Len() > MaxShareFile {
		return nil, fmt.Errorf("%w: the encrypted share has %d bytes (limit %d): too many or too large recipients", ErrBadPolicy, buf.Len(), MaxShareFile)
	}
	return buf.Bytes(), nil
}

// DomainEscrow is the domain of a VM key sealed inside a bundle (see
// vtpm.Binding): a key sealed for escrow never opens as an envelope at rest
// or a transfer envelope, and vice versa.
const DomainEscrow vtpm.Domain = "vtpmm/escrow/v1"

// keyBinding binds the sealed VM key to every byte from the magic to the
// end of the header (ad) and to the VM's generation.
func keyBinding(ad []byte, gen uint64) vtpm.Binding {
	return vtpm.Binding{Domain: DomainEscrow, Fields: [][]byte{ad}, Generation: gen}
}

// bundleSealer seals the VM key with AES-256-GCM under
// HKDF-SHA-256(bundle key, salt = bundle ID), through the project's one
// sealing API (vtpm.Sealer).
func bundleSealer(bk, id []byte, rnd io.Reader) (vtpm.Sealer, error) {
	if len(bk) != 32 {
		return nil, errors.New("bundle key of wrong length")
	}
	k, err := hkdf.Key(sha256.New, bk, id, "vtpmm escrow vm-key v1", 32)
	if err != nil {
		return nil, err
	}
	defer clear(k)
	return vtpm.NewAEADSealer(k, rnd)
}
