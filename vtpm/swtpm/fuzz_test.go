package swtpm_test

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vtpmm/vtpmm/vtpm/swtpm"
)

// stateBlob is an swtpm state file: the version-2 header, then TLVs.
func stateBlob(flags uint16, tlvs ...[]byte) []byte {
	b := []byte{2, 1, 0, 10, byte(flags >> 8), byte(flags), 0, 0, 0, 0}
	for _, v := range tlvs {
		b = append(b, v...)
	}
	binary.BigEndian.PutUint32(b[6:], uint32(len(b)))
	return b
}

func tlv(tag uint16, data []byte) []byte {
	b := binary.BigEndian.AppendUint16(nil, tag)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// FuzzStateFile: swtpm's state files are checked for encryption at rest
// before a rekeyed state replaces the old one, and the header of every
// blob swtpm hands out for a rekey is parsed. The header parser refuses with
// ErrBadStateBlob and what it accepts is consistent with the bytes; the
// check on a directory holding the file agrees with the header: a file
// passes only when it is flagged as encrypted.
func FuzzStateFile(f *testing.F) {
	f.Add(stateBlob(swtpm.BlobFlagEncrypted|swtpm.BlobFlagEncrypted256BitKey, tlv(2, make([]byte, 48))))
	f.Add(stateBlob(0, tlv(1, []byte("plaintext TPM state"))))
	f.Add(stateBlob(swtpm.BlobFlagEncrypted, tlv(2, make([]byte, 16)), tlv(1, []byte("x"))))
	f.Add(stateBlob(swtpm.BlobFlagMigrationEncrypted|swtpm.BlobFlagMigrationData, tlv(3, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})))
	f.Add([]byte{2, 1, 0, 10, 0, 1, 0, 0, 0, 9})
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := swtpm.ParseHeader(b)
		if err != nil && !errors.Is(err, swtpm.ErrBadStateBlob) {
			t.Fatalf("untyped error: %v", err)
		}
		if err == nil && (h.Version < 2 || h.HeaderSize < 10 || int(h.HeaderSize) > len(b) || int(h.TotalLen) != len(b)) {
			t.Fatalf("accepted an inconsistent header %+v for %d bytes", h, len(b))
		}
		if err := os.WriteFile(filepath.Join(dir, "tpm2-00.permall"), b, 0o600); err != nil {
			t.Fatal(err)
		}
		cerr := swtpm.CheckEncryptedAtRest(dir)
		switch {
		case err != nil && !errors.Is(cerr, swtpm.ErrBadStateBlob):
			t.Fatalf("a bad header passed the check: %v", cerr)
		case err == nil && !h.Encrypted() && !errors.Is(cerr, swtpm.ErrNotEncrypted):
			t.Fatalf("a plaintext state file passed the check: %v", cerr)
		case cerr != nil && !errors.Is(cerr, swtpm.ErrBadStateBlob) && !errors.Is(cerr, swtpm.ErrNotEncrypted):
			t.Fatalf("untyped refusal: %v", cerr)
		}
	})
}
