package vtpm

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/vtpmm/vtpmm/internal/atomicfile"
)

// A pending key is a key received by an incoming migration that has not
// committed yet. It is stored like any key (an envelope under the vault)
// but in its own file, DIR/keys/<vm>.<tx>.pending, and it does not raise
// the generation high-water mark until CommitPending: an aborted attempt
// leaves no trace, and a retry may use the same generation.

func (s *KeyStore) pendingPath(vmID, txID string) string {
	return filepath.Join(s.dir, vmID+"."+txID+".pending")
}

func checkTxID(txID string) error {
	if len(txID) < 8 || len(txID) > 64 || strings.Trim(txID, "0123456789abcdef") != "" {
		return fmt.Errorf("%w: transaction id %q must be 8..64 lowercase hex digits", ErrCorrupt, txID)
	}
	return nil
}

// PutPending stores a key for an incoming migration. It refuses a
// generation at or below one this host has held, and a second pending key
// for the same VM under another transaction.
func (s *KeyStore) PutPending(ctx context.Context, vmID, txID string, gen uint64, k VMKey) error {
	if err := CheckVMID(vmID); err != nil {
		return fmt.Errorf("store pending key: %w", err)
	}
	if err := checkTxID(txID); err != nil {
		return fmt.Errorf("store pending key: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if other, _, err := s.pendingLocked(vmID); err == nil && other != txID {
		return fmt.Errorf("store pending key for %s: %w: transaction %s holds a pending key", vmID, ErrKeyExists, other)
	}
	seen, err := s.highWater(vmID)
	if err != nil {
		return fmt.Errorf("store pending key for %s: %w", vmID, err)
	}
	if gen <= seen {
		return fmt.Errorf("store pending key for %s: %w: generation %d, this host has already held generation %d", vmID, ErrStaleGeneration, gen, seen)
	}
	env, err := s.vault.SealVMKey(s.hostID, vmID, gen, k)
	if err != nil {
		return fmt.Errorf("store pending key for %s: %w", vmID, err)
	}
	b, err := MarshalEnvelope(env)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(s.pendingPath(vmID, txID), b, 0o600)
}

// pendingLocked returns the transaction and generation of a VM's pending
// key file. Which transactions are pending is the ledger's to say
// (migrate.Ledger); the key store uses this only to refuse a second
// pending key for a VM.
func (s *KeyStore) pendingLocked(vmID string) (string, uint64, error) {
	matches, _ := filepath.Glob(filepath.Join(s.dir, vmID+".*.pending"))
	if len(matches) == 0 {
		return "", 0, fmt.Errorf("pending key for %s: %w", vmID, ErrKeyNotFound)
	}
	base := filepath.Base(matches[0])
	txID := strings.TrimSuffix(strings.TrimPrefix(base, vmID+"."), ".pending")
	env, err := readEnvelopeFile(matches[0])
	if err != nil {
		return "", 0, err
	}
	return txID, env.Generation, nil
}

// GetPending opens a pending key (no TPM command).
func (s *KeyStore) GetPending(ctx context.Context, vmID, txID string) (VMKey, uint64, error) {
	if err := checkTxID(txID); err != nil {
		return VMKey{}, 0, err
	}
	env, err := readEnvelopeFile(s.pendingPath(vmID, txID))
	if err != nil {
		return VMKey{}, 0, fmt.Errorf("pending key for %s: %w", vmID, err)
	}
	k, err := s.vault.OpenVMKey(env, s.hostID, vmID)
	return k, env.Generation, err
}

// CommitPending makes a pending key the VM's key: an atomic rename over any
// older key file, then the high-water mark moves to its generation.
func (s *KeyStore) CommitPending(ctx context.Context, vmID, txID string) (uint64, error) {
	if err := checkTxID(txID); err != nil {
		return 0, err
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.pendingPath(vmID, txID)
	env, err := readEnvelopeFile(p)
	if err != nil {
		return 0, fmt.Errorf("commit pending key for %s: %w", vmID, err)
	}
	seen, err := s.highWater(vmID)
	if err != nil {
		return 0, err
	}
	if env.Generation <= seen {
		return 0, fmt.Errorf("commit pending key for %s: %w: generation %d, already held %d", vmID, ErrStaleGeneration, env.Generation, seen)
	}
	if err := os.Rename(p, s.keyPath(vmID)); err != nil {
		return 0, fmt.Errorf("commit pending key for %s: %w", vmID, err)
	}
	if err := atomicfile.SyncDir(s.dir); err != nil {
		return 0, err
	}
	return env.Generation, s.writeSeen(vmID, env.Generation)
}

// DropPending shreds a pending key; a missing one is not an error.
func (s *KeyStore) DropPending(ctx context.Context, vmID, txID string) error {
	if err := checkTxID(txID); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := Shred(s.pendingPath(vmID, txID)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("drop pending key for %s: %w", vmID, err)
	}
	return nil
}

func readEnvelopeFile(p string) (*Envelope, error) {
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ErrKeyNotFound
	}
	if err != nil {
		return nil, err
	}
	return UnmarshalEnvelope(b)
}
