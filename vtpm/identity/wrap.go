package identity

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// MaxWrappedSecret is the largest secret Wrap accepts (MAX_SYM_DATA, the
// size limit of a TPM sealed data object).
const MaxWrappedSecret = 128

// WrappedKey is a secret wrapped for one migration key: a TPM duplication
// blob (outer wrapper only) of a sealed data object. Only the TPM holding
// the MK's private key can import it. JSON: base64 fields.
type WrappedKey struct {
	Public    []byte `json:"public"`    // TPMT_PUBLIC of the sealed object
	Duplicate []byte `json:"duplicate"` // TPM2B_PRIVATE contents (outer HMAC + encrypted sensitive)
	Seed      []byte `json:"seed"`      // TPM2B_ENCRYPTED_SECRET contents (ECDH point, label DUPLICATE)
}

// sealedTemplate is the public area of the wrapped object: a keyed-hash
// data object usable with an empty password (userWithAuth), never a key,
// and importable (fixedTPM and fixedParent clear, as TPM2_Import requires).
func sealedTemplate(unique []byte) tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgKeyedHash,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{UserWithAuth: true, NoDA: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash,
			&tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull}}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: unique}),
	}
}

// Wrap wraps secret for the migration key whose TPMT_PUBLIC is mkPublic
// (the verifier's attest.Result.MKPublic). It runs in software (no TPM):
// ECDH with the MK's public point, KDFe/KDFa, AES-128-CFB and an outer
// HMAC, exactly as TPM2_Duplicate would (go-tpm tpm2.CreateDuplicate).
func Wrap(rand io.Reader, mkPublic []byte, secret []byte) (*WrappedKey, error) {
	if len(secret) == 0 || len(secret) > MaxWrappedSecret {
		return nil, fmt.Errorf("wrap: %w: secret of %d bytes, want 1..%d", ErrBadOptions, len(secret), MaxWrappedSecret)
	}
	mk, err := tpm2.Unmarshal[tpm2.TPMTPublic](mkPublic)
	if err != nil {
		return nil, fmt.Errorf("wrap: migration key public area: %w: %v", ErrBadBlob, err)
	}
	a := mk.ObjectAttributes
	if !a.Restricted || !a.Decrypt || a.SignEncrypt {
		return nil, fmt.Errorf("wrap: %w: the migration key is not a restricted decryption (storage) key", ErrBadOptions)
	}
	encap, err := tpm2.ImportEncapsulationKey(mk)
	if err != nil {
		return nil, fmt.Errorf("wrap: migration key: %w", err)
	}
	seedValue := make([]byte, sha256.Size)
	if _, err := io.ReadFull(rand, seedValue); err != nil {
		return nil, fmt.Errorf("wrap: %w", err)
	}
	unique := sha256.Sum256(append(slices.Clone(seedValue), secret...))
	pub := sealedTemplate(unique[:])
	name, err := tpm2.ObjectName(&pub)
	if err != nil {
		return nil, fmt.Errorf("wrap: %w", err)
	}
	sens := tpm2.Marshal(tpm2.TPMTSensitive{
		SensitiveType: tpm2.TPMAlgKeyedHash,
		SeedValue:     tpm2.TPM2BDigest{Buffer: seedValue},
		Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BSensitiveData{Buffer: secret}),
	})
	defer clear(sens)
	dup, seed, err := tpm2.CreateDuplicate(rand, encap, name.Buffer, sens)
	if err != nil {
		return nil, fmt.Errorf("wrap: %w", err)
	}
	return &WrappedKey{Public: tpm2.Marshal(pub), Duplicate: dup, Seed: seed}, nil
}

// UnwrapOptions configures Unwrap.
type UnwrapOptions struct {
	// PolicyPCRs are the SHA-256 PCRs of the MK's PCR policy (the same
	// selection given to MKPolicyDigest). Required when the MK has an
	// authPolicy; ignored otherwise.
	PolicyPCRs []int
}

// Unwrap imports a wrapped secret under the migration key and returns it:
// TPM2_Import under the MK, Load, Unseal, FlushContext (4 TPM commands;
// 8 with a PCR-bound MK: StartAuthSession, PolicyPCR twice and a flush of
// the session). The caller wipes the returned bytes after use.
//
// A blob made for another MK, or tampered with, is ErrUnwrap; a PCR-bound
// MK whose policy fails is ErrMKPolicy.
func Unwrap(ctx context.Context, tpm transport.TPM, mk Key, w *WrappedKey, opts UnwrapOptions) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if w == nil || len(w.Public) == 0 || len(w.Duplicate) == 0 || len(w.Seed) == 0 {
		return nil, fmt.Errorf("unwrap: %w: missing public, duplicate or seed", ErrBadBlob)
	}
	objPub, err := tpm2.Unmarshal[tpm2.TPMTPublic](w.Public)
	if err != nil {
		return nil, fmt.Errorf("unwrap: %w: public area: %v", ErrBadBlob, err)
	}
	if objPub.Type != tpm2.TPMAlgKeyedHash || objPub.ObjectAttributes.FixedTPM || objPub.ObjectAttributes.SignEncrypt || objPub.ObjectAttributes.Decrypt {
		return nil, fmt.Errorf("unwrap: %w: the wrapped object is not a sealed data object", ErrBadBlob)
	}
	mkPub, err := mk.public()
	if err != nil {
		return nil, fmt.Errorf("unwrap: %w", err)
	}
	parent := mk.auth()
	var policy func() error
	if len(mkPub.AuthPolicy.Buffer) > 0 {
		if len(opts.PolicyPCRs) == 0 {
			return nil, fmt.Errorf("unwrap: %w: the migration key is PCR-bound; PolicyPCRs is required", ErrBadOptions)
		}
		sess, closeSess, err := tpm2.PolicySession(tpm, tpm2.TPMAlgSHA256, 16)
		if err != nil {
			return nil, tpmError("unwrap: start MK policy session", err)
		}
		defer func() { _ = closeSess() }()
		parent.Auth = sess
		policy = func() error {
			_, err := tpm2.PolicyPCR{PolicySession: sess.Handle(), Pcrs: pcrSelection(opts.PolicyPCRs)}.Execute(tpm)
			return tpmError("unwrap: PolicyPCR", err)
		}
	}
	if policy != nil {
		if err := policy(); err != nil {
			return nil, err
		}
	}
	imp, err := tpm2.Import{
		ParentHandle: parent,
		ObjectPublic: tpm2.BytesAs2B[tpm2.TPMTPublic](w.Public),
		Duplicate:    tpm2.TPM2BPrivate{Buffer: w.Duplicate},
		InSymSeed:    tpm2.TPM2BEncryptedSecret{Buffer: w.Seed},
		Symmetric:    tpm2.TPMTSymDef{Algorithm: tpm2.TPMAlgNull},
	}.Execute(tpm)
	if err != nil {
		return nil, unwrapError("import", err)
	}
	if policy != nil {
		if err := policy(); err != nil {
			return nil, err
		}
	}
	lr, err := tpm2.Load{ParentHandle: parent, InPrivate: imp.OutPrivate, InPublic: tpm2.BytesAs2B[tpm2.TPMTPublic](w.Public)}.Execute(tpm)
	if err != nil {
		return nil, unwrapError("load", err)
	}
	defer flush(tpm, lr.ObjectHandle)
	us, err := tpm2.Unseal{ItemHandle: tpm2.AuthHandle{Handle: lr.ObjectHandle, Name: lr.Name, Auth: tpm2.PasswordAuth(nil)}}.Execute(tpm)
	if err != nil {
		return nil, unwrapError("unseal", err)
	}
	return us.OutData.Buffer, nil
}

func unwrapError(op string, err error) error {
	switch {
	case errors.Is(err, tpm2.TPMRCPolicyFail), errors.Is(err, tpm2.TPMRCPCRChanged):
		return fmt.Errorf("unwrap: %s: %w: %w", op, ErrMKPolicy, err)
	case isIntegrity(err), errors.Is(err, tpm2.TPMRCBinding), errors.Is(err, tpm2.TPMRCAttributes):
		return fmt.Errorf("unwrap: %s: %w: %w", op, ErrUnwrap, err)
	}
	return tpmError("unwrap: "+op, err)
}

// pcrSelection selects SHA-256 PCRs.
func pcrSelection(pcrs []int) tpm2.TPMLPCRSelection {
	u := make([]uint, len(pcrs))
	for i, p := range pcrs {
		u[i] = uint(p)
	}
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(u...),
	}}}
}

// MKPolicyDigest computes in software the authPolicy of a PCR-bound
// migration key: PolicyPCR over the SHA-256 PCRs pcrs with the given
// values (e.g. the golden values of the attestation policy). Give the
// result to ProvisionOptions.MKPolicy and to the verifier policy's
// migration_key.auth_policy.
func MKPolicyDigest(pcrs []int, values map[int][]byte) ([]byte, error) {
	sorted := slices.Sorted(slices.Values(pcrs))
	sorted = slices.Compact(sorted)
	if len(sorted) == 0 {
		return nil, fmt.Errorf("MK policy: %w: no PCRs", ErrBadOptions)
	}
	h := sha256.New()
	for _, i := range sorted {
		v, ok := values[i]
		if i < 0 || i > 23 || !ok || len(v) != sha256.Size {
			return nil, fmt.Errorf("MK policy: %w: PCR %d needs a SHA-256 value", ErrBadOptions, i)
		}
		h.Write(v)
	}
	calc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		return nil, err
	}
	if err := (tpm2.PolicyPCR{PcrDigest: tpm2.TPM2BDigest{Buffer: h.Sum(nil)}, Pcrs: pcrSelection(sorted)}).Update(calc); err != nil {
		return nil, fmt.Errorf("MK policy: %w", err)
	}
	return calc.Hash().Digest, nil
}
