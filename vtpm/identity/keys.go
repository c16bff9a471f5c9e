package identity

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/vtpm"
)

// Persistent handles of the vtpmm keys. They are in the owner (storage)
// range 0x81000000-0x8100ffff, next to the SRK at vtpm.DefaultSRKHandle,
// because both keys are children of the SRK.
const (
	DefaultAKHandle tpm2.TPMHandle = 0x81000010
	DefaultMKHandle tpm2.TPMHandle = 0x81000011
)

// Handles names the persistent handles vtpmm uses. The zero value means
// the defaults.
type Handles struct {
	SRK tpm2.TPMHandle // default vtpm.DefaultSRKHandle
	AK  tpm2.TPMHandle // default DefaultAKHandle
	MK  tpm2.TPMHandle // default DefaultMKHandle
}

func (h Handles) withDefaults() Handles {
	if h.SRK == 0 {
		h.SRK = vtpm.DefaultSRKHandle
	}
	if h.AK == 0 {
		h.AK = DefaultAKHandle
	}
	if h.MK == 0 {
		h.MK = DefaultMKHandle
	}
	return h
}

// Key is a persistent key: its handle, Name and TPMT_PUBLIC bytes (exactly
// as the TPM returned them).
type Key struct {
	Handle tpm2.TPMHandle
	Name   []byte
	Public []byte

	pub *tpm2.TPMTPublic
}

// Named returns the key as a tpm2.NamedHandle.
func (k Key) Named() tpm2.NamedHandle {
	return tpm2.NamedHandle{Handle: k.Handle, Name: tpm2.TPM2BName{Buffer: k.Name}}
}

func (k Key) auth() tpm2.AuthHandle {
	return tpm2.AuthHandle{Handle: k.Handle, Name: tpm2.TPM2BName{Buffer: k.Name}, Auth: tpm2.PasswordAuth(nil)}
}

// AKTemplate is the AK: ECC P-256, ECDSA SHA-256, restricted signing,
// fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, noDA.
var AKTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true, NoDA: true,
		Restricted: true, SignEncrypt: true,
	},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
		Scheme: tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA,
			&tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256})},
		CurveID: tpm2.TPMECCNistP256,
		KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
	}),
	Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
}

// MKTemplate returns the MK template: ECC P-256 restricted decryption
// (storage) key, AES-128-CFB, SHA-256 nameAlg, fixedTPM, fixedParent,
// sensitiveDataOrigin, noDA. With an empty authPolicy the key is used with
// its (empty) auth value (userWithAuth). With a policy (MKPolicyDigest),
// userWithAuth is clear: importing under the MK then requires the policy.
func MKTemplate(authPolicy []byte) tpm2.TPMTPublic {
	t := tpm2.ECCSRKTemplate // the TCG storage key shape; the verifier requires exactly this
	t.ObjectAttributes = tpm2.TPMAObject{
		FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: len(authPolicy) == 0, NoDA: true,
		Restricted: true, Decrypt: true,
	}
	t.AuthPolicy = tpm2.TPM2BDigest{Buffer: bytes.Clone(authPolicy)}
	t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{})
	return t
}

// readKey reads the public area at a persistent handle (one ReadPublic).
// A missing object is ErrNotProvisioned.
func readKey(tpm transport.TPM, h tpm2.TPMHandle, what string) (Key, error) {
	rsp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(tpm)
	if err != nil {
		if isNoObject(err) {
			return Key{}, fmt.Errorf("read %s 0x%08x: %w: no object at that handle", what, uint32(h), ErrNotProvisioned)
		}
		return Key{}, tpmError(fmt.Sprintf("read %s 0x%08x", what, uint32(h)), err)
	}
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		return Key{}, fmt.Errorf("read %s: %w: %v", what, vtpm.ErrTPMResponse, err)
	}
	return Key{Handle: h, Name: rsp.Name.Buffer, Public: rsp.OutPublic.Bytes(), pub: pub}, nil
}

// sameShape compares everything but the unique field (the key itself).
func sameShape(a, b *tpm2.TPMTPublic) bool {
	x, y := *a, *b
	x.Unique, y.Unique = tpm2.TPMUPublicID{}, tpm2.TPMUPublicID{}
	return bytes.Equal(tpm2.Marshal(x), tpm2.Marshal(y))
}

// ensureChild makes sure a child of the SRK with template tmpl is
// persistent at h. It creates the key (Create, Load, EvictControl, Flush)
// only when h is empty: provisioning only.
func ensureChild(ctx context.Context, tpm transport.TPM, srkHandle, h tpm2.TPMHandle, tmpl tpm2.TPMTPublic, what string) (Key, error) {
	if err := ctx.Err(); err != nil {
		return Key{}, err
	}
	k, err := readKey(tpm, h, what)
	if err == nil {
		if !sameShape(k.pub, &tmpl) {
			return Key{}, fmt.Errorf("ensure %s 0x%08x: %w: the key there has other attributes or parameters (EvictControl it away to re-provision)",
				what, uint32(h), ErrHandleInUse)
		}
		return k, nil
	}
	if !errors.Is(err, ErrNotProvisioned) {
		return Key{}, err
	}
	srk, err := readKey(tpm, srkHandle, "SRK")
	if err != nil {
		return Key{}, err
	}
	cr, err := tpm2.Create{ParentHandle: srk.auth(), InPublic: tpm2.New2B(tmpl)}.Execute(tpm)
	if err != nil {
		return Key{}, tpmError("create "+what, err)
	}
	lr, err := tpm2.Load{ParentHandle: srk.auth(), InPrivate: cr.OutPrivate, InPublic: cr.OutPublic}.Execute(tpm)
	if err != nil {
		return Key{}, tpmError("load "+what, err)
	}
	defer flush(tpm, lr.ObjectHandle)
	_, err = tpm2.EvictControl{
		Auth:             tpm2.TPMRHOwner,
		ObjectHandle:     &tpm2.NamedHandle{Handle: lr.ObjectHandle, Name: lr.Name},
		PersistentHandle: h,
	}.Execute(tpm)
	if err != nil {
		return Key{}, tpmError(fmt.Sprintf("persist %s at 0x%08x", what, uint32(h)), err)
	}
	return readKey(tpm, h, what)
}

// EnsureAK makes sure the AK is persistent at its handle and returns it.
// Idempotent; it creates the key only when the handle is empty
// (provisioning, never a request path). The SRK must exist.
func EnsureAK(ctx context.Context, tpm transport.TPM, h Handles) (Key, error) {
	h = h.withDefaults()
	return ensureChild(ctx, tpm, h.SRK, h.AK, AKTemplate, "AK")
}

// EnsureMK makes sure the migration key is persistent at its handle, with
// authPolicy (nil: none; see MKPolicyDigest), and returns it. Idempotent;
// a key with another policy at the handle is ErrHandleInUse.
func EnsureMK(ctx context.Context, tpm transport.TPM, h Handles, authPolicy []byte) (Key, error) {
	h = h.withDefaults()
	return ensureChild(ctx, tpm, h.SRK, h.MK, MKTemplate(authPolicy), "MK")
}

// ProvisionOptions configures Provision.
type ProvisionOptions struct {
	Handles Handles
	// MKPolicy optionally binds the migration key to PCR values
	// (MKPolicyDigest); the verifier's migration_key.auth_policy must then
	// name the same digest.
	MKPolicy []byte
	// CreateEK creates and persists an RSA-2048 EK (TCG template) when the
	// TPM has no persistent EK. RSA key generation takes seconds on a
	// discrete TPM: provisioning only.
	CreateEK bool
}

// Provision ensures the SRK (vtpm.EnsureSRK), the AK and the MK, and the EK
// if asked, and returns the identity. It is idempotent: on a provisioned
// TPM it only reads public areas.
func Provision(ctx context.Context, tpm transport.TPM, opts ProvisionOptions) (*Identity, error) {
	h := opts.Handles.withDefaults()
	if _, err := vtpm.EnsureSRK(ctx, tpm, h.SRK); err != nil {
		return nil, fmt.Errorf("provision: %w", err)
	}
	if opts.CreateEK {
		if err := EnsureEK(ctx, tpm); err != nil {
			return nil, fmt.Errorf("provision: %w", err)
		}
	}
	if _, err := EnsureAK(ctx, tpm, h); err != nil {
		return nil, fmt.Errorf("provision: %w", err)
	}
	if _, err := EnsureMK(ctx, tpm, h, opts.MKPolicy); err != nil {
		return nil, fmt.Errorf("provision: %w", err)
	}
	return LoadIdentity(ctx, tpm, LoadOptions{Handles: h})
}

// flush releases a transient object or session. Errors are ignored: it
// runs in defers after the real result is known.
func flush(tpm transport.TPM, h tpm2.TPMHandle) {
	_, _ = tpm2.FlushContext{FlushHandle: h}.Execute(tpm)
}

// public returns the parsed public area.
func (k Key) public() (*tpm2.TPMTPublic, error) {
	if k.pub != nil {
		return k.pub, nil
	}
	p, err := tpm2.Unmarshal[tpm2.TPMTPublic](k.Public)
	if err != nil {
		return nil, fmt.Errorf("key 0x%08x: %w: %v", uint32(k.Handle), vtpm.ErrTPMResponse, err)
	}
	return p, nil
}
