package vtpm

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/vtpmm/vtpmm/internal/atomicfile"
)

// KeyStore keeps each VM's key on disk as an Envelope under the vault, one
// file per VM in DIR/keys. Files rather than a database: every write is an
// atomic rename of one small file, a deleted key can be shredded in place
// (a B+tree such as bbolt leaves freed pages with old ciphertext behind),
// and an operator can back up or inspect a single VM's envelope.
//
// The store also keeps, per VM, the highest generation it has ever held,
// even after the key is deleted, and refuses to store a key at or below it.
type KeyStore struct {
	dir    string
	hostID string
	vault  *Vault
	rand   io.Reader
	now    func() time.Time

	mu sync.Mutex // serialises read-modify-write of one store
}

// KeyInfo describes a stored key without opening it.
type KeyInfo struct {
	VMID       string
	Generation uint64
	KeyID      string
}

// NewKeyStore opens (creating if needed) the key store in dataDir/keys.
// rand is the source of new VM keys; nil means crypto/rand.
func NewKeyStore(dataDir, hostID string, v *Vault, rnd io.Reader) (*KeyStore, error) {
	if rnd == nil {
		rnd = rand.Reader
	}
	if hostID == "" {
		return nil, fmt.Errorf("key store: empty host ID")
	}
	dir := filepath.Join(dataDir, "keys")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("key store: %w", err)
	}
	return &KeyStore{dir: dir, hostID: hostID, vault: v, rand: rnd, now: time.Now}, nil
}

func (s *KeyStore) keyPath(vmID string) string  { return filepath.Join(s.dir, vmID+".key") }
func (s *KeyStore) seenPath(vmID string) string { return filepath.Join(s.dir, vmID+".seen") }

// Create generates and stores a new key for a VM at the next generation.
func (s *KeyStore) Create(ctx context.Context, vmID string) (VMKey, uint64, error) {
	if err := CheckVMID(vmID); err != nil {
		return VMKey{}, 0, fmt.Errorf("create key: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := os.Stat(s.keyPath(vmID)); err == nil {
		return VMKey{}, 0, fmt.Errorf("create key for %s: %w", vmID, ErrKeyExists)
	}
	seen, err := s.highWater(vmID)
	if err != nil {
		return VMKey{}, 0, fmt.Errorf("create key for %s: %w", vmID, err)
	}
	k, err := NewVMKey(s.rand)
	if err != nil {
		return VMKey{}, 0, err
	}
	gen := seen + 1
	if err := s.write(ctx, vmID, gen, k); err != nil {
		k.Destroy()
		return VMKey{}, 0, fmt.Errorf("create key for %s: %w", vmID, err)
	}
	return k, gen, nil
}

// Put stores a key received for a VM (an import). It refuses a generation
// at or below any generation this host has held for the VM.
func (s *KeyStore) Put(ctx context.Context, vmID string, gen uint64, k VMKey) error {
	if err := CheckVMID(vmID); err != nil {
		return fmt.Errorf("store key: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	seen, err := s.highWater(vmID)
	if err != nil {
		return fmt.Errorf("store key for %s: %w", vmID, err)
	}
	if gen <= seen {
		return fmt.Errorf("store key for %s: %w: generation %d, this host has already held generation %d", vmID, ErrStaleGeneration, gen, seen)
	}
	if err := s.write(ctx, vmID, gen, k); err != nil {
		return fmt.Errorf("store key for %s: %w", vmID, err)
	}
	return nil
}

func (s *KeyStore) write(ctx context.Context, vmID string, gen uint64, k VMKey) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	env, err := s.vault.SealVMKey(s.hostID, vmID, gen, k)
	if err != nil {
		return err
	}
	b, err := MarshalEnvelope(env)
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(s.keyPath(vmID), b, 0o600); err != nil {
		return err
	}
	return s.writeSeen(vmID, gen)
}

// Get opens a VM's key: no TPM command, the vault key is in memory.
func (s *KeyStore) Get(ctx context.Context, vmID string) (VMKey, uint64, error) {
	if err := CheckVMID(vmID); err != nil {
		return VMKey{}, 0, fmt.Errorf("get key: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return VMKey{}, 0, err
	}
	env, err := s.readEnvelope(vmID)
	if err != nil {
		return VMKey{}, 0, err
	}
	// A stale copy (an old envelope restored over a newer one) is never
	// handed out: every start and every export goes through Get.
	if seen, err := s.seenGeneration(vmID); err != nil {
		return VMKey{}, 0, err
	} else if env.Generation < seen {
		return VMKey{}, 0, fmt.Errorf("get key for %s: %w: the stored envelope is generation %d, this host has held generation %d (a restored old copy?)",
			vmID, ErrStaleGeneration, env.Generation, seen)
	}
	k, err := s.vault.OpenVMKey(env, s.hostID, vmID)
	if err != nil {
		return VMKey{}, 0, err
	}
	return k, env.Generation, nil
}

// WithPassphrase opens a VM's key (no TPM command), hands its passphrase
// to fn and wipes key and passphrase when fn returns. It returns the key's
// generation. This is the one way vtpmm uses a stored key as libvirt's or
// swtpm's secret.
func (s *KeyStore) WithPassphrase(ctx context.Context, vmID string, fn func(pass []byte) error) (uint64, error) {
	k, gen, err := s.Get(ctx, vmID)
	if err != nil {
		return 0, err
	}
	defer k.Destroy()
	return gen, k.WithPassphrase(fn)
}

func (s *KeyStore) readEnvelope(vmID string) (*Envelope, error) {
	b, err := os.ReadFile(s.keyPath(vmID))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("get key for %s: %w", vmID, ErrKeyNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get key for %s: %w", vmID, err)
	}
	env, err := UnmarshalEnvelope(b)
	if err != nil {
		return nil, fmt.Errorf("get key for %s: %w", vmID, err)
	}
	return env, nil
}

// Delete shreds a VM's key. The generation high-water mark stays.
func (s *KeyStore) Delete(ctx context.Context, vmID string) error {
	if err := CheckVMID(vmID); err != nil {
		return fmt.Errorf("delete key: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	err := Shred(s.keyPath(vmID))
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("delete key for %s: %w", vmID, ErrKeyNotFound)
	}
	return err
}

// List returns the stored keys, sorted by VM ID, without opening them.
func (s *KeyStore) List(ctx context.Context) ([]KeyInfo, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("list keys: %w", err)
	}
	var out []KeyInfo
	for _, e := range ents {
		id, ok := strings.CutSuffix(e.Name(), ".key")
		if !ok || CheckVMID(id) != nil {
			continue
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		env, err := s.readEnvelope(id)
		if err != nil {
			return nil, err
		}
		out = append(out, KeyInfo{VMID: id, Generation: env.Generation, KeyID: env.KeyID})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VMID < out[j].VMID })
	return out, nil
}

// seenRecord is the generation high-water mark of one VM. Not secret.
type seenRecord struct {
	VMID    string    `json:"vm"`
	MaxGen  uint64    `json:"max_gen"`
	Updated time.Time `json:"updated"`
}

// seenGeneration reads the VM's generation high-water record (0 if none).
func (s *KeyStore) seenGeneration(vmID string) (uint64, error) {
	b, err := os.ReadFile(s.seenPath(vmID))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return 0, nil
	case err != nil:
		return 0, err
	}
	var r seenRecord
	if err := json.Unmarshal(b, &r); err != nil || r.VMID != vmID {
		return 0, fmt.Errorf("%w: generation record %s", ErrCorrupt, s.seenPath(vmID))
	}
	return r.MaxGen, nil
}

func (s *KeyStore) highWater(vmID string) (uint64, error) {
	max, err := s.seenGeneration(vmID)
	if err != nil {
		return 0, err
	}
	if env, err := s.readEnvelope(vmID); err == nil && env.Generation > max {
		max = env.Generation
	} else if err != nil && !errors.Is(err, ErrKeyNotFound) {
		return 0, err
	}
	return max, nil
}

func (s *KeyStore) writeSeen(vmID string, gen uint64) error {
	b, err := json.Marshal(seenRecord{VMID: vmID, MaxGen: gen, Updated: s.now().UTC()})
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(s.seenPath(vmID), b, 0o600)
}
