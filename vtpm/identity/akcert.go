package identity

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"os"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/attest"
)

// AKCertSource says where the host's AK certificate is: an NV index (a
// manufacturer's IAK certificate, or one the operator stored there) or a
// file (an enterprise CA's AK certificate). The zero value means the host
// has none. TCG "TPM 2.0 Keys for Device Identity and Attestation" leaves
// where an IAK certificate is kept to the platform, so vtpmm assumes no
// index: configure the one your platform uses.
type AKCertSource struct {
	NV   tpm2.TPMHandle // NV index holding the certificate (DER, PEM or with the TCG NV header)
	File string         // file holding the certificate
}

// IsZero reports whether no source is configured.
func (s AKCertSource) IsZero() bool { return s.NV == 0 && s.File == "" }

func (s AKCertSource) String() string {
	switch {
	case s.NV != 0 && s.File != "":
		return fmt.Sprintf("NV 0x%08x and file %s", uint32(s.NV), s.File)
	case s.NV != 0:
		return fmt.Sprintf("NV 0x%08x", uint32(s.NV))
	case s.File != "":
		return "file " + s.File
	}
	return "none"
}

// ReadAKCert reads the AK certificate from src and checks that it
// certifies ak (the AK's TPMT_PUBLIC): a certificate for another key is
// ErrAKCertMismatch, an absent or unparseable one ErrNoAKCert. It returns
// the certificate's DER (PEM and the TCG NV header removed). One NV read
// per 1024 bytes; no TPM command for a file.
func ReadAKCert(ctx context.Context, tpm transport.TPM, src AKCertSource, ak []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if src.NV != 0 && src.File != "" {
		return nil, fmt.Errorf("read AK certificate: %w: both an NV index and a file configured", ErrBadOptions)
	}
	var raw []byte
	var err error
	switch {
	case src.NV != 0:
		raw, err = ReadNV(tpm, src.NV)
		if errors.Is(err, ErrNotProvisioned) {
			return nil, fmt.Errorf("read AK certificate from %s: %w: %w", src, ErrNoAKCert, err)
		}
	case src.File != "":
		raw, err = os.ReadFile(src.File)
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("read AK certificate from %s: %w: %w", src, ErrNoAKCert, err)
		}
	default:
		return nil, fmt.Errorf("read AK certificate: %w: no source configured", ErrNoAKCert)
	}
	if err != nil {
		return nil, fmt.Errorf("read AK certificate from %s: %w", src, err)
	}
	certs, err := attest.ParseCertificates(raw)
	if err != nil {
		return nil, fmt.Errorf("read AK certificate from %s: %w: %w", src, ErrNoAKCert, err)
	}
	pub, err := attest.ParsePublic("AK", ak)
	if err != nil {
		return nil, fmt.Errorf("read AK certificate: %w", err)
	}
	key, err := pub.CryptoKey()
	if err != nil {
		return nil, fmt.Errorf("read AK certificate: %w", err)
	}
	eq, ok := key.(interface{ Equal(crypto.PublicKey) bool })
	if certs[0].PublicKey == nil || !ok || !eq.Equal(certs[0].PublicKey) {
		return nil, fmt.Errorf("read AK certificate from %s: %w: %s certifies another key", src, ErrAKCertMismatch, certs[0].Label())
	}
	return certs[0].Raw, nil
}

// StoreAKCertNV writes der to a new NV index idx (owner authorization,
// readable with owner authorization, as ReadNV reads it), in chunks of at
// most 1024 bytes. It is a provisioning step, for an AK certificate an
// enterprise CA issued for this TPM's AK; an index that already exists is
// ErrHandleInUse.
func StoreAKCertNV(ctx context.Context, tpm transport.TPM, idx tpm2.TPMHandle, der []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	op := fmt.Sprintf("store AK certificate in NV 0x%08x", uint32(idx))
	if len(der) == 0 || len(der) > 4096 {
		return fmt.Errorf("%s: %w: %d bytes", op, ErrBadOptions, len(der))
	}
	if _, err := (tpm2.NVReadPublic{NVIndex: idx}).Execute(tpm); err == nil {
		return fmt.Errorf("%s: %w: the index exists", op, ErrHandleInUse)
	} else if !isNoObject(err) {
		return tpmError(op, err)
	}
	pub := tpm2.TPMSNVPublic{
		NVIndex: idx, NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, AuthRead: true, NoDA: true, NT: tpm2.TPMNTOrdinary},
		DataSize:   uint16(len(der)),
	}
	if _, err := (tpm2.NVDefineSpace{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		PublicInfo: tpm2.New2B(pub),
	}).Execute(tpm); err != nil {
		return tpmError(op, err)
	}
	for off := 0; off < len(der); off += 1024 {
		end := min(off+1024, len(der))
		rp, err := (tpm2.NVReadPublic{NVIndex: idx}).Execute(tpm) // the name changes once written
		if err != nil {
			return tpmError(op, err)
		}
		if _, err := (tpm2.NVWrite{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: idx, Name: rp.NVName},
			Data:       tpm2.TPM2BMaxNVBuffer{Buffer: der[off:end]},
			Offset:     uint16(off),
		}).Execute(tpm); err != nil {
			return tpmError(op, err)
		}
	}
	return nil
}
