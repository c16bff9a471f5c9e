package vtpm

import (
	"github.com/vtpmm/vtpmm/internal/atomicfile"

	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// A rekey replaces a VM's key at the same generation (the VM's owner does
// not change): the new key is stored first as DIR/keys/<vm>.rekey (an
// envelope under the vault, like any key), the vTPM state is re-encrypted
// (swtpm.Rekey), and CommitRekey renames it over <vm>.key. Until then the
// active key still opens the state; after a crash, swtpm.RecoverRekey says
// which of the two opens it, and the caller commits or drops accordingly.

func (s *KeyStore) rekeyPath(vmID string) string { return filepath.Join(s.dir, vmID+".rekey") }

// PutRekey stores the new key of a rekey, beside the VM's active key and at
// its generation. It refuses a VM without an active key, and a second
// pending rekey (ErrKeyExists: recover the first).
func (s *KeyStore) PutRekey(ctx context.Context, vmID string, k VMKey) error {
	if err := CheckVMID(vmID); err != nil {
		return fmt.Errorf("store rekey: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := os.Lstat(s.rekeyPath(vmID)); err == nil {
		return fmt.Errorf("store rekey for %s: %w: a rekey is pending", vmID, ErrKeyExists)
	}
	env, err := s.readEnvelope(vmID)
	if err != nil {
		return fmt.Errorf("store rekey: %w", err)
	}
	ne, err := s.vault.SealVMKey(s.hostID, vmID, env.Generation, k)
	if err != nil {
		return fmt.Errorf("store rekey for %s: %w", vmID, err)
	}
	b, err := MarshalEnvelope(ne)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(s.rekeyPath(vmID), b, 0o600)
}

// GetRekey opens the pending new key of a rekey (no TPM command).
func (s *KeyStore) GetRekey(ctx context.Context, vmID string) (VMKey, error) {
	if err := CheckVMID(vmID); err != nil {
		return VMKey{}, fmt.Errorf("get rekey: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return VMKey{}, err
	}
	env, err := readEnvelopeFile(s.rekeyPath(vmID))
	if err != nil {
		return VMKey{}, fmt.Errorf("get rekey for %s: %w", vmID, err)
	}
	return s.vault.OpenVMKey(env, s.hostID, vmID)
}

// CommitRekey makes the pending new key the VM's key (one atomic rename).
// It refuses when the active key's generation moved since PutRekey (the VM
// was migrated meanwhile). Without a pending rekey it does nothing, so a
// recovery can call it again.
func (s *KeyStore) CommitRekey(ctx context.Context, vmID string) error {
	if err := CheckVMID(vmID); err != nil {
		return fmt.Errorf("commit rekey: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ne, err := readEnvelopeFile(s.rekeyPath(vmID))
	if errors.Is(err, ErrKeyNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("commit rekey for %s: %w", vmID, err)
	}
	cur, err := s.readEnvelope(vmID)
	if err != nil {
		return fmt.Errorf("commit rekey: %w", err)
	}
	if cur.Generation != ne.Generation {
		return fmt.Errorf("commit rekey for %s: %w: the active key is generation %d, the rekey was for %d", vmID, ErrStaleGeneration, cur.Generation, ne.Generation)
	}
	if err := os.Rename(s.rekeyPath(vmID), s.keyPath(vmID)); err != nil {
		return fmt.Errorf("commit rekey for %s: %w", vmID, err)
	}
	return atomicfile.SyncDir(s.dir)
}

// DropRekey shreds a pending new key; a missing one is not an error.
func (s *KeyStore) DropRekey(ctx context.Context, vmID string) error {
	if err := CheckVMID(vmID); err != nil {
		return fmt.Errorf("drop rekey: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := Shred(s.rekeyPath(vmID)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("drop rekey for %s: %w", vmID, err)
	}
	return nil
}
