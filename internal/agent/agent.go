package agent

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/atomicfile"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

func tpmHandle(h uint32) tpm2.TPMHandle { return tpm2.TPMHandle(h) }

// Options are the dependencies an Agent gets injected.
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

// Agent is one host's vtpmd: an open, metered host TPM, the unsealed vault
// and the key store. Create it with Open; Close wipes the vault key.
type Agent struct {
	cfg   Config
	opts  Options
	log   logrus.FieldLogger
	meter *vtpm.Meter
	vault *vtpm.Vault
	keys  *vtpm.KeyStore

	mu     sync.Mutex
	procs  map[string]*vmProcess // by VM UUID
	closed bool
}

// hostRecord ties a data directory to a host ID. Not secret.
type hostRecord struct {
	HostID  string    `json:"host_id"`
	Created time.Time `json:"created"`
}

func hostRecordPath(cfg Config) string { return filepath.Join(cfg.DataDir, "host.json") }

func openMeteredTPM(ctx context.Context, cfg Config, opts Options) (*vtpm.Meter, error) {
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
// and a new vault sealed to the configured PCRs.
func Init(ctx context.Context, cfg Config, opts Options, io InitOptions) (*InitResult, error) {
	opts = opts.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("init: %w", err)
	}
	m, err := openMeteredTPM(ctx, cfg, opts)
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
	if err := atomicfile.WriteFile(hostRecordPath(cfg), b, 0o600); err != nil {
		return nil, fmt.Errorf("init: %w", err)
	}
	opts.Log.WithFields(logrus.Fields{"host": cfg.HostID, "key_id": v.KeyID(), "sealed_to": v.SealedTo(),
		"tpm_cmds": m.Stats().Total}).Info("vault initialised")
	return &InitResult{HostID: cfg.HostID, KeyID: v.KeyID(), SealedTo: v.SealedTo(), RecoveryKey: rk, TPMStats: m.Stats(),
		AKName: hex.EncodeToString(id.AK.Name), MKName: hex.EncodeToString(id.MK.Name)}, nil
}

// Open opens the host TPM and unseals the vault: the only TPM work a source
// host does for its VMs. Afterwards opening a VM key costs no TPM command.
func Open(ctx context.Context, cfg Config, opts Options) (*Agent, error) {
	return open(ctx, cfg, opts, nil)
}

// Recover opens the vault with the recovery key and reseals it to the
// current boot state, so the next Open works by PCRs again.
func Recover(ctx context.Context, cfg Config, opts Options, rk *vtpm.RecoveryKey) (*Agent, error) {
	return open(ctx, cfg, opts, rk)
}

func open(ctx context.Context, cfg Config, opts Options, rk *vtpm.RecoveryKey) (*Agent, error) {
	opts = opts.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := checkHostRecord(cfg); err != nil {
		return nil, err
	}
	m, err := openMeteredTPM(ctx, cfg, opts)
	if err != nil {
		return nil, fmt.Errorf("open agent: %w", err)
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
	return &Agent{cfg: cfg, opts: opts, log: log, meter: m, vault: v, keys: ks, procs: map[string]*vmProcess{}}, nil
}

func checkHostRecord(cfg Config) error {
	b, err := os.ReadFile(hostRecordPath(cfg))
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("open agent: %w: %s has no host.json (run 'vtpmd init')", vtpm.ErrVaultNotInitialized, cfg.DataDir)
	}
	if err != nil {
		return fmt.Errorf("open agent: %w", err)
	}
	var r hostRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return fmt.Errorf("open agent: %w: host.json: %v", vtpm.ErrCorrupt, err)
	}
	if r.HostID != cfg.HostID {
		return fmt.Errorf("open agent: %w: data_dir %s belongs to host %q, the configuration says %q", ErrConfig, cfg.DataDir, r.HostID, cfg.HostID)
	}
	return nil
}

// Meter returns the metered host TPM transport (command counts, profile).
func (a *Agent) Meter() *vtpm.Meter { return a.meter }

// Keys returns the key store.
func (a *Agent) Keys() *vtpm.KeyStore { return a.keys }

// VaultKeyID returns the vault key's ID.
func (a *Agent) VaultKeyID() string { return a.vault.KeyID() }

// SealedTo describes what the vault is sealed to.
func (a *Agent) SealedTo() []string { return a.vault.SealedTo() }

// Reseal seals the vault to the current PCRs plus predicted values.
func (a *Agent) Reseal(ctx context.Context, predicted []vtpm.PCRValues) error {
	if err := a.vault.Reseal(ctx, a.meter, vtpm.ResealOptions{Predicted: predicted}); err != nil {
		return err
	}
	a.log.WithField("sealed_to", a.vault.SealedTo()).Info("vault resealed")
	return nil
}

// Close stops every vTPM this agent runs, wipes the vault key and closes the TPM.
func (a *Agent) Close(ctx context.Context) error {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return nil
	}
	a.closed = true
	procs := a.procs
	a.procs = map[string]*vmProcess{}
	a.mu.Unlock()
	var errs []error
	for _, p := range procs {
		errs = append(errs, p.stop(ctx))
	}
	a.vault.Close()
	errs = append(errs, a.meter.Close())
	return errors.Join(errs...)
}
