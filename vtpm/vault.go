package vtpm

import (
	"context"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// VaultFileName is the name of the vault file inside the data directory.
const VaultFileName = "vault.json"

// VaultConfig says where the vault lives and what it is sealed to.
type VaultConfig struct {
	Dir       string         // data directory; the vault file is Dir/vault.json
	SRKHandle tpm2.TPMHandle // persistent SRK; DefaultSRKHandle when zero
	PCRs      PCRSelection   // sealing selection for Init and Reseal; DefaultPCRs when empty
	Rand      io.Reader      // crypto/rand.Reader when nil
	Now       func() time.Time
}

func (c VaultConfig) withDefaults() VaultConfig {
	if c.SRKHandle == 0 {
		c.SRKHandle = DefaultSRKHandle
	}
	if len(c.PCRs.PCRs) == 0 {
		c.PCRs = DefaultPCRs
	}
	if c.Rand == nil {
		c.Rand = rand.Reader
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return c
}

func (c VaultConfig) path() string { return filepath.Join(c.Dir, VaultFileName) }

// Vault holds the host vault key in memory. It is unsealed once, when vtpmd
// starts, and every per-VM key is encrypted under it. The key never leaves
// the process: Vault has no accessor for it.
type Vault struct {
	cfg   VaultConfig
	file  vaultFile
	key   *secret32
	keyID string
	aead  cipher.AEAD
}

// KeyID identifies the vault key without revealing it. Every envelope
// records the key ID that made it.
func (v *Vault) KeyID() string { return v.keyID }

// SealedTo describes the PCR selections and labels of the vault's slots.
func (v *Vault) SealedTo() []string {
	out := make([]string, 0, len(v.file.Slots))
	for _, s := range v.file.Slots {
		out = append(out, s.describe())
	}
	return out
}

// Close wipes the vault key from memory. The vault is unusable afterwards.
func (v *Vault) Close() {
	if v.key != nil {
		v.key.wipe()
	}
	v.aead = nil
}

// InitOptions tunes InitVault.
type InitOptions struct {
	// RecoveryKey, when non-nil, adds a recovery slot that opens the vault
	// on this TPM with the recovery key, whatever the PCRs say.
	RecoveryKey *RecoveryKey
}

// InitVault creates a new vault key, seals it to the current PCR values of
// cfg.PCRs under the SRK (creating the SRK if the TPM has none) and writes
// the vault file. It refuses to overwrite an existing vault.
func InitVault(ctx context.Context, tpm transport.TPM, cfg VaultConfig, opts InitOptions) (*Vault, error) {
	cfg = cfg.withDefaults()
	if _, err := os.Stat(cfg.path()); err == nil {
		return nil, fmt.Errorf("init vault %s: %w", cfg.path(), ErrVaultExists)
	}
	if _, err := EnsureSRK(ctx, tpm, cfg.SRKHandle); err != nil {
		return nil, fmt.Errorf("init vault: %w", err)
	}
	srk, err := readSRK(tpm, cfg.SRKHandle)
	if err != nil {
		return nil, fmt.Errorf("init vault: %w", err)
	}
	key, err := newSecret32(cfg.Rand)
	if err != nil {
		return nil, fmt.Errorf("init vault: %w", err)
	}
	v, err := newVault(cfg, key)
	if err != nil {
		return nil, err
	}
	v.file = vaultFile{
		Version:   vaultFileVersion,
		KeyID:     v.keyID,
		SRKHandle: uint32(cfg.SRKHandle),
		SRKName:   hex.EncodeToString(srk.Name.Buffer),
		Created:   cfg.Now().UTC(),
	}
	values, err := ReadPCRs(tpm, cfg.PCRs)
	if err != nil {
		v.Close()
		return nil, fmt.Errorf("init vault: %w", err)
	}
	slot, err := sealPCRSlot(tpm, srk, key, cfg.PCRs, values, "boot state at init", cfg.Now())
	if err != nil {
		v.Close()
		return nil, fmt.Errorf("init vault: %w", err)
	}
	v.file.Slots = []slotFile{slot}
	if opts.RecoveryKey != nil {
		rs, err := sealRecoverySlot(tpm, srk, key, opts.RecoveryKey, cfg.Now())
		if err != nil {
			v.Close()
			return nil, fmt.Errorf("init vault: %w", err)
		}
		v.file.Slots = append(v.file.Slots, rs)
	}
	if err := v.save(); err != nil {
		v.Close()
		return nil, fmt.Errorf("init vault: %w", err)
	}
	return v, nil
}

// OpenVault unseals the vault key. It reads the SRK and the PCRs first, so
// a wrong TPM or a changed boot state is reported precisely (ErrWrongTPM,
// or a *PCRMismatchError naming each changed PCR) before anything is
// unsealed. Cost: ReadPublic, PCR_Read, StartAuthSession, Load, PolicyPCR,
// Unseal, FlushContext.
func OpenVault(ctx context.Context, tpm transport.TPM, cfg VaultConfig) (*Vault, error) {
	cfg = cfg.withDefaults()
	f, srk, err := loadVaultFile(tpm, cfg)
	if err != nil {
		return nil, fmt.Errorf("open vault: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	mismatch := &PCRMismatchError{}
	for _, s := range f.Slots {
		if s.Kind != slotPCR {
			continue
		}
		sel, want, err := s.pcrs()
		if err != nil {
			return nil, fmt.Errorf("open vault: %w: slot %q: %v", ErrCorrupt, s.Label, err)
		}
		have, err := ReadPCRs(tpm, sel)
		if err != nil {
			return nil, fmt.Errorf("open vault: %w", err)
		}
		if changed := diffPCRs(sel, want, have); len(changed) > 0 {
			mismatch.Slots = append(mismatch.Slots, SlotMismatch{Label: s.Label, Changed: changed})
			continue
		}
		key, err := unsealPCRSlot(tpm, srk, s, sel, want)
		if err != nil {
			return nil, fmt.Errorf("open vault: %w", err)
		}
		return finishOpen(cfg, f, key)
	}
	if len(mismatch.Slots) == 0 {
		return nil, fmt.Errorf("open vault: %w: no PCR slot in %s", ErrCorrupt, cfg.path())
	}
	return nil, fmt.Errorf("open vault: %w", mismatch)
}

// RecoverVault opens the vault with the recovery key instead of the PCR
// policy. It works only on the TPM that sealed the vault. Follow it with
// Reseal, so that the next start opens by PCRs again.
func RecoverVault(ctx context.Context, tpm transport.TPM, cfg VaultConfig, rk *RecoveryKey) (*Vault, error) {
	cfg = cfg.withDefaults()
	f, srk, err := loadVaultFile(tpm, cfg)
	if err != nil {
		return nil, fmt.Errorf("recover vault: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	for _, s := range f.Slots {
		if s.Kind != slotRecovery {
			continue
		}
		key, err := unsealRecoverySlot(tpm, srk, s, rk)
		if err != nil {
			return nil, fmt.Errorf("recover vault: %w", err)
		}
		return finishOpen(cfg, f, key)
	}
	return nil, fmt.Errorf("recover vault: %w: this vault has no recovery slot (it was initialised without a recovery key)", ErrRecoveryKey)
}

func loadVaultFile(tpm transport.TPM, cfg VaultConfig) (vaultFile, srkInfo, error) {
	f, err := readVaultFile(cfg.path())
	if err != nil {
		return vaultFile{}, srkInfo{}, err
	}
	srk, err := readSRK(tpm, tpm2.TPMHandle(f.SRKHandle))
	if err != nil {
		return vaultFile{}, srkInfo{}, fmt.Errorf("%w (was this data directory copied from another host?)", err)
	}
	if hex.EncodeToString(srk.Name.Buffer) != f.SRKName {
		return vaultFile{}, srkInfo{}, fmt.Errorf("%w: the SRK at 0x%08x is not the one the vault was sealed under (was this data directory copied from another host?)",
			ErrWrongTPM, f.SRKHandle)
	}
	return f, srk, nil
}

func finishOpen(cfg VaultConfig, f vaultFile, key *secret32) (*Vault, error) {
	v, err := newVault(cfg, key)
	if err != nil {
		return nil, err
	}
	if subtle.ConstantTimeCompare([]byte(v.keyID), []byte(f.KeyID)) != 1 {
		v.Close()
		return nil, fmt.Errorf("open vault: %w: unsealed key has ID %s, the vault file says %s", ErrCorrupt, v.keyID, f.KeyID)
	}
	v.file = f
	return v, nil
}

// ResealOptions says what Reseal seals to.
type ResealOptions struct {
	// PCRs, when non-empty, replaces the PCR selection.
	PCRs PCRSelection
	// Predicted adds slots for PCR values expected after a planned update
	// (for example replayed from the new event log). The current boot state
	// stays sealed too, so both the old and the new boot open the vault.
	Predicted []PCRValues
	// Recovery, when non-nil, replaces the recovery slot.
	Recovery *RecoveryKey
}

// Reseal seals the open vault key again: to the current PCR values, plus
// any predicted ones. It replaces every PCR slot and keeps the recovery
// slot unless a new recovery key is given. The vault file is replaced
// atomically, so a crash leaves either the old or the new file.
func (v *Vault) Reseal(ctx context.Context, tpm transport.TPM, opts ResealOptions) error {
	if v.key == nil || v.aead == nil {
		return fmt.Errorf("reseal vault: %w", ErrVaultLocked)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	srk, err := readSRK(tpm, tpm2.TPMHandle(v.file.SRKHandle))
	if err != nil {
		return fmt.Errorf("reseal vault: %w", err)
	}
	sel := v.cfg.PCRs
	if len(opts.PCRs.PCRs) > 0 {
		sel = opts.PCRs
	}
	cur, err := ReadPCRs(tpm, sel)
	if err != nil {
		return fmt.Errorf("reseal vault: %w", err)
	}
	now := v.cfg.Now()
	cur0, err := sealPCRSlot(tpm, srk, v.key, sel, cur, "boot state at reseal", now)
	if err != nil {
		return fmt.Errorf("reseal vault: %w", err)
	}
	slots := []slotFile{cur0}
	for i, p := range opts.Predicted {
		s, err := sealPCRSlot(tpm, srk, v.key, sel, p, fmt.Sprintf("predicted #%d", i+1), now)
		if err != nil {
			return fmt.Errorf("reseal vault: predicted values #%d: %w", i+1, err)
		}
		slots = append(slots, s)
	}
	for _, s := range v.file.Slots {
		if s.Kind == slotRecovery && opts.Recovery == nil {
			slots = append(slots, s)
		}
	}
	if opts.Recovery != nil {
		rs, err := sealRecoverySlot(tpm, srk, v.key, opts.Recovery, now)
		if err != nil {
			return fmt.Errorf("reseal vault: %w", err)
		}
		slots = append(slots, rs)
	}
	next := v.file
	next.Slots = slots
	next.Updated = now.UTC()
	old := v.file
	v.file = next
	if err := v.save(); err != nil {
		v.file = old
		return fmt.Errorf("reseal vault: %w", err)
	}
	v.cfg.PCRs = sel
	return nil
}

func newVault(cfg VaultConfig, key *secret32) (*Vault, error) {
	id, err := hkdf.Key(sha256.New, key[:], nil, "vtpmm vault key id v1", 8)
	if err != nil {
		return nil, err
	}
	aead, err := newEnvelopeAEAD(key)
	if err != nil {
		return nil, err
	}
	return &Vault{cfg: cfg, key: key, keyID: hex.EncodeToString(id), aead: aead}, nil
}

func (v *Vault) save() error {
	return writeVaultFile(v.cfg.path(), v.file)
}

// envelopeAEAD returns the envelope cipher, or ErrVaultLocked after Close.
func (v *Vault) envelopeAEAD() (cipher.AEAD, error) {
	if v == nil || v.aead == nil {
		return nil, ErrVaultLocked
	}
	return v.aead, nil
}
