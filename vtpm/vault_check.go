package vtpm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/go-tpm/tpm2"
)

// VaultFileError says what is wrong with the vault file and what to do. It
// unwraps to ErrVaultNotInitialized, ErrCorrupt or ErrUnsupportedVersion.
type VaultFileError struct {
	Path    string
	Problem string
	Err     error
}

func (e *VaultFileError) Error() string {
	fix := "restore vault.json from this host's backup (it holds no plaintext key; a copy from this host's own backup opens only on this TPM); without it the VM keys on this host cannot be opened"
	switch {
	case errors.Is(e.Err, ErrVaultNotInitialized):
		fix = "run 'vtpmd init' on a new host; on a host with VMs, restore vault.json from its backup"
	case errors.Is(e.Err, ErrUnsupportedVersion):
		fix = "run the vtpmd version that wrote it, or a newer one"
	}
	return fmt.Sprintf("vault file %s: %v: %s; %s", e.Path, e.Err, e.Problem, fix)
}

// Unwrap returns the sentinel.
func (e *VaultFileError) Unwrap() error { return e.Err }

// CheckVaultFile checks DATA/vault.json without the TPM: that it exists, is
// a regular file, decodes, has a known version, and that every slot holds a
// decodable TPM public and private area and, for PCR slots, a value for
// every PCR of its selection. It returns nil or a *VaultFileError.
func CheckVaultFile(dataDir string) error {
	path := filepath.Join(dataDir, VaultFileName)
	bad := func(err error, format string, a ...any) error {
		return &VaultFileError{Path: path, Problem: fmt.Sprintf(format, a...), Err: err}
	}
	st, err := os.Lstat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return bad(ErrVaultNotInitialized, "does not exist")
	case err != nil:
		return bad(ErrCorrupt, "cannot be read: %v", err)
	case !st.Mode().IsRegular():
		return bad(ErrCorrupt, "is not a regular file (%v)", st.Mode().Type())
	case st.Size() == 0:
		return bad(ErrCorrupt, "the file is empty")
	case st.Size() > maxVaultFile:
		return bad(ErrCorrupt, "the file is %d bytes, more than %d", st.Size(), maxVaultFile)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return bad(ErrCorrupt, "cannot be read: %v", err)
	}
	f, err := decodeVaultFile(b)
	if err != nil {
		if errors.Is(err, ErrUnsupportedVersion) {
			return bad(ErrUnsupportedVersion, "%s", trimSentinel(err, ErrUnsupportedVersion))
		}
		return bad(ErrCorrupt, "%s", trimSentinel(err, ErrCorrupt))
	}
	pcrSlots := 0
	for i, s := range f.Slots {
		if _, err := tpm2.Unmarshal[tpm2.TPM2BPublic](s.Public); err != nil {
			return bad(ErrCorrupt, "slot %d (%q): public area does not decode: %v", i, s.Label, err)
		}
		if _, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](s.Private); err != nil {
			return bad(ErrCorrupt, "slot %d (%q): private area does not decode: %v", i, s.Label, err)
		}
		switch s.Kind {
		case slotPCR:
			pcrSlots++
			if _, _, err := s.pcrs(); err != nil {
				return bad(ErrCorrupt, "slot %d (%q): %v", i, s.Label, err)
			}
		case slotRecovery:
		default:
			return bad(ErrCorrupt, "slot %d has unknown kind %q", i, s.Kind)
		}
	}
	if pcrSlots == 0 {
		return bad(ErrCorrupt, "no PCR slot")
	}
	return nil
}

// trimSentinel drops the leading "sentinel: " repetitions from err's text,
// for a Problem field that is printed after the sentinel.
func trimSentinel(err, sentinel error) string {
	s := err.Error()
	for {
		t := strings.TrimPrefix(s, sentinel.Error()+": ")
		if t == s {
			return s
		}
		s = t
	}
}
