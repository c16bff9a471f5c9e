// Package guestseal owns the guest side of tenant secrets: it seals a
// secret inside a (v)TPM under a PolicyPCR policy and unseals it again. The
// sealed object lives at a fixed persistent handle, so it travels with the
// vTPM state across migrations, and a small NV index records the PCR
// selection and the values sealed to, so Unseal needs no arguments and can
// name the PCRs that changed. Every transient object and session is flushed.
package guestseal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

const (
	// SealedHandle is the persistent handle of the sealed object.
	SealedHandle tpm2.TPMHandle = 0x81000100
	// MetaIndex is the owner NV index that records the PCR selection and
	// the values sealed to (not secret: PCRs are readable by anyone).
	MetaIndex tpm2.TPMHandle = 0x01000100
	// MaxSecret is the largest secret a sealed data object holds.
	MaxSecret   = 128
	metaVersion = 1
)

// PolicyError says which PCRs differ from the values sealed to.
type PolicyError struct {
	Changed []int
	Err     error
}

func (e *PolicyError) Error() string {
	if len(e.Changed) == 0 {
		return fmt.Sprintf("%v: %v", ErrPolicy, e.Err)
	}
	var s []string
	for _, p := range e.Changed {
		s = append(s, fmt.Sprint(p))
	}
	return fmt.Sprintf("%v: PCR %s differ from the sealed values", ErrPolicy, strings.Join(s, ", "))
}

// Is matches ErrPolicy.
func (e *PolicyError) Is(t error) bool { return t == ErrPolicy }

// Unwrap returns the TPM error.
func (e *PolicyError) Unwrap() error { return e.Err }

func owner() tpm2.AuthHandle {
	return tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}
}

func selection(pcrs []int) tpm2.TPMLPCRSelection {
	u := make([]uint, len(pcrs))
	for i, p := range pcrs {
		u[i] = uint(p)
	}
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
		{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(u...)},
	}}
}

// Seal seals secret in the TPM under a PolicyPCR policy over the current
// SHA-256 values of pcrs, and persists it at SealedHandle (replacing an
// older one). The primary is the ECC P-256 SRK template (owner hierarchy).
func Seal(ctx context.Context, tpm transport.TPM, secret []byte, pcrs []int) (err error) {
	if len(secret) == 0 || len(secret) > MaxSecret {
		return fmt.Errorf("seal: %w: secret of %d bytes (1..%d)", ErrBadInput, len(secret), MaxSecret)
	}
	pcrs = slices.Sorted(slices.Values(pcrs))
	pcrs = slices.Compact(pcrs)
	if len(pcrs) == 0 || pcrs[0] < 0 || pcrs[len(pcrs)-1] > 23 {
		return fmt.Errorf("seal: %w: PCRs %v (want 1 or more of 0..23)", ErrBadInput, pcrs)
	}
	values, err := readPCRs(tpm, pcrs)
	if err != nil {
		return fmt.Errorf("seal: %w", err)
	}
	sel := selection(pcrs)

	// Policy digest from a trial session over the current PCR values.
	trial, closeTrial, err := tpm2.PolicySession(tpm, tpm2.TPMAlgSHA256, 16, tpm2.Trial())
	if err != nil {
		return fmt.Errorf("seal: trial session: %w", err)
	}
	_, err = tpm2.PolicyPCR{PolicySession: trial.Handle(), Pcrs: sel}.Execute(tpm)
	var dg *tpm2.PolicyGetDigestResponse
	if err == nil {
		dg, err = tpm2.PolicyGetDigest{PolicySession: trial.Handle()}.Execute(tpm)
	}
	if cerr := closeTrial(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("seal: policy digest: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("seal: %w", err)
	}

	srk, err := tpm2.CreatePrimary{PrimaryHandle: owner(), InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}.Execute(tpm)
	if err != nil {
		return fmt.Errorf("seal: CreatePrimary(SRK): %w", err)
	}
	defer flush(tpm, srk.ObjectHandle, &err)
	tmpl := tpm2.TPMTPublic{
		Type: tpm2.TPMAlgKeyedHash, NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, NoDA: true},
		AuthPolicy:       dg.PolicyDigest,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash,
			&tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull}}),
	}
	parent := tpm2.AuthHandle{Handle: srk.ObjectHandle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)}
	cr, err := tpm2.Create{
		ParentHandle: parent,
		InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
			Data: tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: secret})}},
		InPublic: tpm2.New2B(tmpl),
	}.Execute(tpm)
	if err != nil {
		return fmt.Errorf("seal: Create(sealed object): %w", err)
	}
	lr, err := tpm2.Load{ParentHandle: parent, InPrivate: cr.OutPrivate, InPublic: cr.OutPublic}.Execute(tpm)
	if err != nil {
		return fmt.Errorf("seal: Load: %w", err)
	}
	defer flush(tpm, lr.ObjectHandle, &err)

	if err := evictOld(tpm); err != nil {
		return fmt.Errorf("seal: %w", err)
	}
	if _, err := (tpm2.EvictControl{
		Auth: owner(), ObjectHandle: &tpm2.NamedHandle{Handle: lr.ObjectHandle, Name: lr.Name}, PersistentHandle: SealedHandle,
	}).Execute(tpm); err != nil {
		return fmt.Errorf("seal: EvictControl(persist at %#x): %w", SealedHandle, err)
	}
	if err := writeMeta(tpm, pcrs, values); err != nil {
		return fmt.Errorf("seal: %w", err)
	}
	return nil
}

// Unseal returns the sealed secret. It runs a policy session with
// PolicyPCR over the recorded PCR selection and TPM2_Unseal on the
// persistent object. PCRs that changed since Seal give a *PolicyError
// (ErrPolicy) that names them.
func Unseal(ctx context.Context, tpm transport.TPM) ([]byte, error) {
	pcrs, sealed, err := readMeta(tpm)
	if err != nil {
		return nil, fmt.Errorf("unseal: %w", err)
	}
	rp, err := tpm2.ReadPublic{ObjectHandle: SealedHandle}.Execute(tpm)
	if err != nil {
		if isRC(err, tpm2.TPMRCHandle) {
			return nil, fmt.Errorf("unseal: %w (nothing at %#x)", ErrNotSealed, SealedHandle)
		}
		return nil, fmt.Errorf("unseal: ReadPublic(%#x): %w", SealedHandle, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("unseal: %w", err)
	}
	sess, closeSess, err := tpm2.PolicySession(tpm, tpm2.TPMAlgSHA256, 16)
	if err != nil {
		return nil, fmt.Errorf("unseal: policy session: %w", err)
	}
	defer func() { _ = closeSess() }()
	if _, err := (tpm2.PolicyPCR{PolicySession: sess.Handle(), Pcrs: selection(pcrs)}).Execute(tpm); err != nil {
		return nil, fmt.Errorf("unseal: PolicyPCR: %w", err)
	}
	ur, err := tpm2.Unseal{ItemHandle: tpm2.AuthHandle{Handle: SealedHandle, Name: rp.Name, Auth: sess}}.Execute(tpm)
	if err != nil {
		if isRC(err, tpm2.TPMRCPolicyFail) {
			pe := &PolicyError{Err: err}
			if now, rerr := readPCRs(tpm, pcrs); rerr == nil {
				for i, p := range pcrs {
					if !bytes.Equal(now[i], sealed[i]) {
						pe.Changed = append(pe.Changed, p)
					}
				}
			}
			return nil, fmt.Errorf("unseal: %w", pe)
		}
		return nil, fmt.Errorf("unseal: Unseal: %w", err)
	}
	return ur.OutData.Buffer, nil
}

// Clear removes the sealed object and its NV record, if present.
func Clear(ctx context.Context, tpm transport.TPM) error {
	if err := evictOld(tpm); err != nil {
		return fmt.Errorf("clear: %w", err)
	}
	if err := undefineMeta(tpm); err != nil {
		return fmt.Errorf("clear: %w", err)
	}
	return ctx.Err()
}

func evictOld(tpm transport.TPM) error {
	rp, err := tpm2.ReadPublic{ObjectHandle: SealedHandle}.Execute(tpm)
	if err != nil {
		if isRC(err, tpm2.TPMRCHandle) {
			return nil
		}
		return fmt.Errorf("ReadPublic(%#x): %w", SealedHandle, err)
	}
	_, err = tpm2.EvictControl{
		Auth: owner(), ObjectHandle: &tpm2.NamedHandle{Handle: SealedHandle, Name: rp.Name}, PersistentHandle: SealedHandle,
	}.Execute(tpm)
	if err != nil {
		return fmt.Errorf("EvictControl(remove %#x): %w", SealedHandle, err)
	}
	return nil
}

func readPCRs(tpm transport.TPM, pcrs []int) ([][]byte, error) {
	out := make([][]byte, 0, len(pcrs))
	// PCR_Read returns at most 8 digests per call; read one at a time.
	for _, p := range pcrs {
		r, err := tpm2.PCRRead{PCRSelectionIn: selection([]int{p})}.Execute(tpm)
		if err != nil {
			return nil, fmt.Errorf("PCR_Read(%d): %w", p, err)
		}
		if len(r.PCRValues.Digests) != 1 {
			return nil, fmt.Errorf("PCR_Read(%d): %w: no SHA-256 bank", p, ErrBadInput)
		}
		out = append(out, r.PCRValues.Digests[0].Buffer)
	}
	return out, nil
}

func flush(tpm transport.TPM, h tpm2.TPMHandle, errp *error) {
	if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(tpm); err != nil && *errp == nil {
		*errp = fmt.Errorf("FlushContext(%#x): %w", h, err)
	}
}

// isRC matches a TPM response code, ignoring handle/parameter/session
// numbers of format-1 codes.
func isRC(err error, rc tpm2.TPMRC) bool { return errors.Is(err, rc) }
