package host

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/atomicfile"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// Options are the dependencies a Host gets injected.
type Options struct {
	Log         logrus.FieldLogger // nil: discard
	Now         func() time.Time   // nil: time.Now
	OpenOptions []vtpm.OpenOption  // extra TPM URI schemes (e.g. the simulator)
	Rand        io.Reader          // source of vault and VM keys; nil: crypto/rand
}

func (o Options) withDefaults() Options {
	if o.Log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		o.Log = l
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return o
}

// Host is one host's open, metered TPM, its unsealed vault and key store,
// and the vTPMs it runs. Create it with Open or Recover; Close stops its
// vTPMs, wipes the vault key and closes the TPM.
type Host struct {
	cfg    Config
	layout Layout
	opts   Options
	log    logrus.FieldLogger
	meter  *vtpm.Meter
	vault  *vtpm.Vault
	keys   *vtpm.KeyStore

	mu     sync.Mutex
	procs  map[string]*vmProcess // by VM UUID
	closed bool
}

// hostRecord ties a data directory to a host ID. Not secret.
type hostRecord struct {
	HostID  string    `json:"host_id"`
	Created time.Time `json:"created"`
}

// OpenTPM opens the configured host TPM behind a command meter with the
// configured latency profile. The caller closes it.
func OpenTPM(ctx context.Context, cfg Config, opts Options) (*vtpm.Meter, error) {
	prof, err := vtpm.ProfileByName(cfg.TPMProfile)
	if err != nil {
		return nil, fmt.Errorf("%w: tpm_profile: %v", ErrConfig, err)
	}
	t, err := vtpm.Open(ctx, cfg.TPM, opts.OpenOptions...)
	if err != nil {
		return nil, err
	}
	return vtpm.NewMeter(t, prof), nil
}

// InitOptions tunes Init.
type InitOptions struct {
	// RecoveryKey asks for a recovery key slot; the key is returned once.
	RecoveryKey bool
}

// InitResult reports what Init created. RecoveryKey, when set, must be
// shown to the operator once and then destroyed.
type InitResult struct {
	HostID      string
	KeyID       string
	SealedTo    []string
	RecoveryKey *vtpm.RecoveryKey
	TPMStats    vtpm.Stats
	AKName      string // attestation key (persistent in the TPM)
	MKName      string // migration key (persistent in the TPM)
}

// Init provisions a host: the data directory, the SRK if the TPM has none,
// a new vault sealed to the configured PCRs, and the AK and migration key.
func Init(ctx context.Context, cfg Config, opts Options, io InitOptions) (*InitResult, error) {
	opts = opts.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("init: %w", err)
	}
	m, err := OpenTPM(ctx, cfg, opts)
	if err != nil {
		return nil, fmt.Errorf("init: %w", err)
	}
	defer m.Close()
	var rk *vtpm.RecoveryKey
	if io.RecoveryKey {
		if rk, err = vtpm.NewRecoveryKey(nil); err != nil {
			return nil, err
		}
	}
	vc := cfg.vaultConfig()
	vc.Rand = opts.Rand
	v, err := vtpm.InitVault(ctx, m, vc, vtpm.InitOptions{RecoveryKey: rk})
	if err != nil {
		return nil, fmt.Errorf("init: %w", err)
	}
	defer v.Close()
	id, err := identity.Provision(ctx, m, identity.ProvisionOptions{})
	if err != nil {
		return nil, fmt.Errorf("init: provision AK and migration key: %w", err)
	}
	b, _ := json.Marshal(hostRecord{HostID: cfg.HostID, Created: opts.Now().UTC()})
	if err := atomicfile.WriteFile(cfg.Layout().HostRecord(), b, 0o600); err != nil {
		return nil, fmt.Errorf("init: %w", err)
	}
	opts.Log.WithFields(logrus.Fields{"host": cfg.HostID, "key_id": v.KeyID(), "sealed_to": v.SealedTo(),
		"tpm_cmds": m.Stats().Total}).Info("vault initialised")
	return &InitResult{HostID: cfg.HostID, KeyID: v.KeyID(), SealedTo: v.SealedTo(), RecoveryKey: rk, TPMStats: m.Stats(),
		AKName: hex.EncodeToString(id.AK.Name), MKName: hex.EncodeToString(id.MK.Name)}, nil
}

// Open opens the host TPM and unseals the vault: the only TPM work a source
// host does for its VMs. Afterwards opening a VM key costs no TPM command.
func Open(ctx context.Context, cfg Config, opts Options) (*Host, error) {
	return open(ctx, cfg, opts, nil)
}

// Recover opens the vault with the recovery key and reseals it to the
// current boot state, so the next Open works by PCRs again.
func Recover(ctx context.Context, cfg Config, opts Options, rk *vtpm.RecoveryKey) (*Host, error) {
	return open(ctx, cfg, opts, rk)
}

func open(ctx context.Context, cfg Config, opts Options, rk *vtpm.RecoveryKey) (*Host, error) {
	opts = opts.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := checkHostRecord(cfg); err != nil {
		return nil, err
	}
	m, err := OpenTPM(ctx, cfg, opts)
	if err != nil {
		return nil, fmt.Errorf("open host: %w", err)
	}
	log := opts.Log.WithField("host", cfg.HostID)
	start := time.Now()
	var v *vtpm.Vault
	if rk != nil {
		v, err = vtpm.RecoverVault(ctx, m, cfg.vaultConfig(), rk)
		if err == nil {
			err = v.Reseal(ctx, m, vtpm.ResealOptions{})
		}
	} else {
		v, err = vtpm.OpenVault(ctx, m, cfg.vaultConfig())
	}
	if err != nil {
		if v != nil {
			v.Close()
		}
		m.Close()
		log.WithError(err).Error("vault did not open")
		return nil, err
	}
	ks, err := vtpm.NewKeyStore(cfg.DataDir, cfg.HostID, v, opts.Rand)
	if err != nil {
		v.Close()
		m.Close()
		return nil, err
	}
	log.WithFields(logrus.Fields{"key_id": v.KeyID(), "tpm_cmds": m.Stats().Total,
		"tpm_commands": m.Stats().String(), "took_ms": time.Since(start).Milliseconds(),
		"recovered": rk != nil}).Info("vault open")
	return &Host{cfg: cfg, layout: cfg.Layout(), opts: opts, log: log, meter: m, vault: v, keys: ks, procs: map[string]*vmProcess{}}, nil
}

func checkHostRecord(cfg Config) error {
	p := cfg.Layout().HostRecord()
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("open host: %w: %s has no host.json (run 'vtpmd init')", vtpm.ErrVaultNotInitialized, cfg.DataDir)
	}
	if err != nil {
		return fmt.Errorf("open host: %w", err)
	}
	var r hostRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return fmt.Errorf("open host: %w: host.json: %v", vtpm.ErrCorrupt, err)
	}
	if r.HostID != cfg.HostID {
		return fmt.Errorf("open host: %w: data_dir %s belongs to host %q, the configuration says %q", ErrConfig, cfg.DataDir, r.HostID, cfg.HostID)
	}
	return nil
}

// ID is the host's ID.
func (h *Host) ID() string { return h.cfg.HostID }

// Layout is where the host keeps its files.
func (h *Host) Layout() Layout { return h.layout }

// Meter returns the metered host TPM transport (command counts, profile).
func (h *Host) Meter() *vtpm.Meter { return h.meter }

// Keys returns the key store.
func (h *Host) Keys() *vtpm.KeyStore { return h.keys }

// VaultKeyID returns the vault key's ID.
func (h *Host) VaultKeyID() string { return h.vault.KeyID() }

// SealedTo describes what the vault is sealed to.
func (h *Host) SealedTo() []string { return h.vault.SealedTo() }

// Reseal seals the vault to the current PCRs plus predicted values.
func (h *Host) Reseal(ctx context.Context, predicted []vtpm.PCRValues) error {
	if err := h.vault.Reseal(ctx, h.meter, vtpm.ResealOptions{Predicted: predicted}); err != nil {
		return err
	}
	h.log.WithField("sealed_to", h.vault.SealedTo()).Info("vault resealed")
	return nil
}

// Close stops every vTPM this host runs, wipes the vault key and closes
// the TPM. A second Close does nothing.
func (h *Host) Close(ctx context.Context) error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return nil
	}
	h.closed = true
	procs := h.procs
	h.procs = map[string]*vmProcess{}
	h.mu.Unlock()
	var errs []error
	for _, p := range procs {
		errs = append(errs, p.stop(ctx))
	}
	h.vault.Close()
	errs = append(errs, h.meter.Close())
	return errors.Join(errs...)
}
