package vtpm

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	"github.com/vtpmm/vtpmm/internal/atomicfile"
	"github.com/vtpmm/vtpmm/internal/strictjson"
)

const (
	vaultFileVersion = 1
	maxVaultFile     = 1 << 20
)

// vaultFile is the on-disk vault: sealed slots and what they are sealed to.
// It holds no plaintext key material; the slots are TPM-encrypted objects
// that only this TPM's SRK can load.
type vaultFile struct {
	Version   int        `json:"version"`
	KeyID     string     `json:"key_id"`
	SRKHandle uint32     `json:"srk_handle"`
	SRKName   string     `json:"srk_name"`
	Slots     []slotFile `json:"slots"`
	Created   time.Time  `json:"created"`
	Updated   time.Time  `json:"updated,omitzero"`
}

func readVaultFile(path string) (vaultFile, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return vaultFile{}, fmt.Errorf("%w: %s does not exist (run 'vtpmd init')", ErrVaultNotInitialized, path)
	}
	if err != nil {
		return vaultFile{}, err
	}
	return decodeVaultFile(b)
}

func decodeVaultFile(b []byte) (vaultFile, error) {
	if len(b) > maxVaultFile {
		return vaultFile{}, fmt.Errorf("%w: vault file is %d bytes", ErrCorrupt, len(b))
	}
	var f vaultFile
	if err := strictjson.Decode(b, &f, maxVaultFile); err != nil {
		return vaultFile{}, fmt.Errorf("%w: vault file: %v", ErrCorrupt, err)
	}
	if f.Version != vaultFileVersion {
		return vaultFile{}, fmt.Errorf("%w: vault file version %d (this build reads %d)", ErrUnsupportedVersion, f.Version, vaultFileVersion)
	}
	if f.KeyID == "" || f.SRKName == "" || len(f.Slots) == 0 {
		return vaultFile{}, fmt.Errorf("%w: vault file lacks key_id, srk_name or slots", ErrCorrupt)
	}
	return f, nil
}

func writeVaultFile(path string, f vaultFile) error {
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, append(b, '\n'), 0o600)
}
