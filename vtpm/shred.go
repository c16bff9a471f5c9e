package vtpm

import (
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/vtpmm/vtpmm/internal/atomicfile"
)

// Shred overwrites a file with random bytes, syncs it and removes it. On
// copy-on-write or wear-levelled storage the old blocks may survive; that
// is why stored keys are only ever ciphertext under the vault key.
func Shred(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("shred %s: %w", path, err)
	}
	st, err := f.Stat()
	if err == nil {
		_, err = io.CopyN(f, rand.Reader, st.Size())
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("shred %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("shred %s: %w", path, err)
	}
	return atomicfile.SyncDir(filepath.Dir(path))
}
