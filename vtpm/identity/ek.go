package identity

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// EKKind selects which endorsement key the host presents.
type EKKind int

// EK kinds. EKAuto takes the first EK found in the order RSA, ECC.
const (
	EKAuto EKKind = iota
	EKRSA
	EKECC
)

func (k EKKind) String() string {
	switch k {
	case EKRSA:
		return "rsa"
	case EKECC:
		return "ecc"
	}
	return "auto"
}

// ParseEKKind parses "auto", "rsa" or "ecc".
func ParseEKKind(s string) (EKKind, error) {
	for _, k := range []EKKind{EKAuto, EKRSA, EKECC} {
		if k.String() == s {
			return k, nil
		}
	}
	return EKAuto, fmt.Errorf("%w: EK kind %q: want auto, rsa or ecc", ErrBadOptions, s)
}

// ekSlot is where a TPM keeps one EK and its certificate (TCG EK
// Credential Profile 2.x, handle and NV index registry).
type ekSlot struct {
	kind   EKKind
	handle tpm2.TPMHandle // persistent EK
	certNV tpm2.TPMHandle // EK certificate NV index
}

// ekSlots in order of preference. swtpm_setup puts its ECC EK, a P-384
// key from the high-range template, at 0x81010016 / 0x01c00016.
var ekSlots = []ekSlot{
	{EKRSA, 0x81010001, 0x01c00002}, // RSA-2048
	{EKECC, 0x81010002, 0x01c0000a}, // ECC NIST P-256
	{EKECC, 0x81010016, 0x01c00016}, // ECC NIST P-384 (high range)
}

// EK is the host's endorsement key.
type EK struct {
	Kind EKKind
	Key
	// Cert is the EK certificate (DER) from NV, or nil when the TPM has
	// none: the operator must then enrol the EK public area.
	Cert []byte
	// CertNV is the NV index the certificate came from (0 if none).
	CertNV tpm2.TPMHandle
}

// Digest is SHA-256 of the EK's TPMT_PUBLIC, the key of enrolment records.
func (e EK) Digest() []byte {
	d := sha256.Sum256(e.Public)
	return d[:]
}

// ReadEK finds the persistent EK of the wanted kind and reads its
// certificate from NV (absent certificate: Cert nil). It never creates a
// key: a TPM without a persistent EK yields ErrNoEK (see EnsureEK).
func ReadEK(ctx context.Context, tpm transport.TPM, kind EKKind) (EK, error) {
	for _, s := range ekSlots {
		if err := ctx.Err(); err != nil {
			return EK{}, err
		}
		if kind != EKAuto && kind != s.kind {
			continue
		}
		k, err := readKey(tpm, s.handle, "EK")
		if errors.Is(err, ErrNotProvisioned) {
			continue
		}
		if err != nil {
			return EK{}, err
		}
		ek := EK{Kind: s.kind, Key: k}
		cert, err := ReadNV(tpm, s.certNV)
		switch {
		case err == nil:
			ek.Cert, ek.CertNV = cert, s.certNV
		case !errors.Is(err, ErrNotProvisioned):
			return EK{}, err
		}
		return ek, nil
	}
	return EK{}, fmt.Errorf("read EK (%s): %w: no persistent EK at 0x81010001, 0x81010002 or 0x81010016 (provision with CreateEK)", kind, ErrNoEK)
}

// ReadNV reads a whole NV index with owner authorization, in chunks of at
// most 1024 bytes (below every TPM's MAX_NV_BUFFER_SIZE). A missing index
// is ErrNotProvisioned.
func ReadNV(tpm transport.TPM, idx tpm2.TPMHandle) ([]byte, error) {
	op := fmt.Sprintf("read NV 0x%08x", uint32(idx))
	pub, err := tpm2.NVReadPublic{NVIndex: idx}.Execute(tpm)
	if err != nil {
		if isNoObject(err) {
			return nil, fmt.Errorf("%s: %w: no such index", op, ErrNotProvisioned)
		}
		return nil, tpmError(op, err)
	}
	c, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	out := make([]byte, 0, c.DataSize)
	for off := uint16(0); off < c.DataSize; {
		n := min(c.DataSize-off, 1024)
		r, err := tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: idx, Name: pub.NVName},
			Size:       n, Offset: off,
		}.Execute(tpm)
		if err != nil {
			return nil, tpmError(op, err)
		}
		out = append(out, r.Data.Buffer...)
		off += n
	}
	return out, nil
}

// EnsureEK makes sure the TPM has a persistent EK: when none is found it
// creates the TCG RSA-2048 EK (CreatePrimary in the endorsement hierarchy,
// deterministic: it is the key the manufacturer certified) and persists it
// at 0x81010001. RSA key generation takes seconds on a discrete TPM: call
// it at provisioning only.
func EnsureEK(ctx context.Context, tpm transport.TPM) error {
	if _, err := ReadEK(ctx, tpm, EKAuto); !errors.Is(err, ErrNoEK) {
		return err
	}
	cp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHEndorsement,
		InPublic:      tpm2.New2B(tpm2.RSAEKTemplate),
	}.Execute(tpm)
	if err != nil {
		return tpmError("create EK", err)
	}
	defer flush(tpm, cp.ObjectHandle)
	_, err = tpm2.EvictControl{
		Auth:             tpm2.TPMRHOwner,
		ObjectHandle:     &tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name},
		PersistentHandle: ekSlots[0].handle,
	}.Execute(tpm)
	return tpmError("persist EK", err)
}

// Identity is what a host presents: its EK (with certificate), AK and MK.
// Read it once (LoadIdentity) and reuse it: it costs 5-7 TPM commands.
type Identity struct {
	EK EK
	AK Key
	MK Key
	// AKCert is the AK certificate (DER) when LoadOptions.AKCert names a
	// source: evidence then carries it (version 2) and the verifier can
	// enrol the host on it (attest.Verifier.EnrollByAKCertificate).
	AKCert []byte
}

// LoadOptions configures LoadIdentity.
type LoadOptions struct {
	Handles Handles
	EKKind  EKKind
	// AKCert, when set, is where the AK certificate is read from; it must
	// certify the AK (ErrAKCertMismatch otherwise).
	AKCert AKCertSource
}

// LoadIdentity reads the provisioned identity: EK (ReadPublic and its
// certificate), AK and MK (ReadPublic each), and the AK certificate when
// opts.AKCert names a source. It never creates a key; a
// missing AK or MK is ErrNotProvisioned, a foreign object
// ErrHandleInUse.
func LoadIdentity(ctx context.Context, tpm transport.TPM, opts LoadOptions) (*Identity, error) {
	h := opts.Handles.withDefaults()
	ek, err := ReadEK(ctx, tpm, opts.EKKind)
	if err != nil {
		return nil, fmt.Errorf("load identity: %w", err)
	}
	ak, err := readKey(tpm, h.AK, "AK")
	if err != nil {
		return nil, fmt.Errorf("load identity: %w", err)
	}
	if !sameShape(ak.pub, &AKTemplate) {
		return nil, fmt.Errorf("load identity: AK 0x%08x: %w: not a vtpmm AK", uint32(h.AK), ErrHandleInUse)
	}
	mk, err := readKey(tpm, h.MK, "MK")
	if err != nil {
		return nil, fmt.Errorf("load identity: %w", err)
	}
	if !sameShape(mk.pub, ptr(MKTemplate(mk.pub.AuthPolicy.Buffer))) {
		return nil, fmt.Errorf("load identity: MK 0x%08x: %w: not a vtpmm migration key", uint32(h.MK), ErrHandleInUse)
	}
	id := &Identity{EK: ek, AK: ak, MK: mk}
	if !opts.AKCert.IsZero() {
		if id.AKCert, err = ReadAKCert(ctx, tpm, opts.AKCert, ak.Public); err != nil {
			return nil, fmt.Errorf("load identity: %w", err)
		}
	}
	return id, nil
}

func ptr[T any](v T) *T { return &v }
