package swtpm

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
)

// State is a vTPM's exported state: the permanent and volatile blobs as
// swtpm hands them out over the control channel, encrypted with the
// migration key (the VM passphrase).
type State struct {
	Permanent []byte
	Volatile  []byte
	// Encrypted reports swtpm's PTM_STATE_FLAG_ENCRYPTED on both blobs.
	Encrypted bool
}

// ExportState reads the permanent and volatile state blobs of an
// initialised TPM and then stops it (CMD_STOP; swtpm keeps running, the TPM
// answers no more commands until Init), so the exported state is the last
// one. The caller must make sure no TPM command is in flight (the guest is
// paused). swtpm 0.7.1 hands out blobs only while the TPM runs: after
// CMD_STOP, CMD_GET_STATEBLOB fails with TPM_BAD_ORDINAL. It refuses to
// return state that is not encrypted.
func ExportState(ctx context.Context, p *Process) (State, error) {
	c := p.Ctrl()
	perm, err := c.GetStateBlob(ctx, BlobPermanent)
	if err != nil {
		return State{}, fmt.Errorf("export vTPM state: %w", err)
	}
	vol, err := c.GetStateBlob(ctx, BlobVolatile)
	if err != nil {
		return State{}, fmt.Errorf("export vTPM state: %w", err)
	}
	if err := c.Stop(ctx); err != nil {
		return State{}, fmt.Errorf("export vTPM state: %w", err)
	}
	if !perm.Encrypted || !vol.Encrypted {
		return State{}, fmt.Errorf("export vTPM state: %w: swtpm returned a plaintext blob (no --migration-key?)", ErrNotEncrypted)
	}
	return State{Permanent: perm.Data, Volatile: vol.Data, Encrypted: true}, nil
}

// ImportState hands exported state to a freshly started swtpm (Start, not
// yet Init) that runs with the same passphrase; call Init afterwards. A
// different passphrase returns an error matching ErrWrongPassphrase.
func ImportState(ctx context.Context, p *Process, s State) error {
	if len(s.Permanent) == 0 {
		return fmt.Errorf("import vTPM state: %w: no permanent state", ErrBadStateBlob)
	}
	c := p.Ctrl()
	for _, b := range []Blob{{Type: BlobPermanent, Data: s.Permanent, Encrypted: s.Encrypted}, {Type: BlobVolatile, Data: s.Volatile, Encrypted: s.Encrypted}} {
		if len(b.Data) == 0 {
			continue
		}
		if err := c.SetStateBlob(ctx, b); err != nil {
			return fmt.Errorf("import vTPM state: %w", err)
		}
	}
	return nil
}

// Blob header flags of swtpm's state files and blobs (swtpm_nvstore.c).
const (
	BlobFlagEncrypted          = 0x1 // encrypted with the state key (--key)
	BlobFlagMigrationEncrypted = 0x2 // encrypted with the migration key
	BlobFlagMigrationData      = 0x4
	BlobFlagEncrypted256BitKey = 0x8 // aes-256-cbc
)

// tagData is the TLV tag of plaintext TPM state inside a blob.
const tagData = 1

// Header is the header of an swtpm state file or blob.
type Header struct {
	Version    uint8
	MinVersion uint8
	HeaderSize uint16
	Flags      uint16
	TotalLen   uint32
}

// Encrypted reports whether the content is encrypted with the state key or
// the migration key.
func (h Header) Encrypted() bool {
	return h.Flags&(BlobFlagEncrypted|BlobFlagMigrationEncrypted) != 0
}

// ParseHeader parses the 10-byte header swtpm writes in front of its state
// (version 2: version, min_version, hdrsize, flags, totlen, big-endian).
func ParseHeader(b []byte) (Header, error) {
	if len(b) < 10 {
		return Header{}, fmt.Errorf("parse swtpm state header: %w: %d bytes", ErrBadStateBlob, len(b))
	}
	h := Header{
		Version: b[0], MinVersion: b[1],
		HeaderSize: binary.BigEndian.Uint16(b[2:4]),
		Flags:      binary.BigEndian.Uint16(b[4:6]),
		TotalLen:   binary.BigEndian.Uint32(b[6:10]),
	}
	if h.Version < 2 || h.HeaderSize < 10 || int(h.HeaderSize) > len(b) || int(h.TotalLen) != len(b) {
		return Header{}, fmt.Errorf("parse swtpm state header: %w: version %d, header %d, total %d of %d bytes",
			ErrBadStateBlob, h.Version, h.HeaderSize, h.TotalLen, len(b))
	}
	return h, nil
}

// hasPlainData reports whether a blob carries a plaintext TAG_DATA TLV
// (tag uint16, length uint32) after its header.
func hasPlainData(b []byte, h Header) bool {
	for off := int(h.HeaderSize); off+6 <= len(b); {
		tag := binary.BigEndian.Uint16(b[off:])
		n := int(binary.BigEndian.Uint32(b[off+2:]))
		if tag == tagData {
			return true
		}
		off += 6 + n
	}
	return false
}

// CheckEncryptedAtRest checks every TPM state file in stateDir
// (tpm2-00.permall, tpm2-00.volatilestate, tpm2-00.savestate): each must
// have an swtpm header flagged as encrypted and no plaintext data TLV.
func CheckEncryptedAtRest(stateDir string) error {
	files, err := filepath.Glob(filepath.Join(stateDir, "tpm2-*"))
	if err != nil {
		return fmt.Errorf("check vTPM state encryption: %w", err)
	}
	if len(files) == 0 {
		return fmt.Errorf("check vTPM state encryption: %w: no state files in %s", ErrBadStateBlob, stateDir)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("check vTPM state encryption: %w", err)
		}
		h, err := ParseHeader(b)
		if err != nil {
			return fmt.Errorf("check vTPM state encryption of %s: %w", filepath.Base(f), err)
		}
		if !h.Encrypted() || hasPlainData(b, h) {
			return fmt.Errorf("check vTPM state encryption: %w: %s (flags %#x)", ErrNotEncrypted, filepath.Base(f), h.Flags)
		}
	}
	return nil
}
