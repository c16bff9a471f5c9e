package agent

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/vtpmm/vtpmm/vtpm"
)

// Config is vtpmd's configuration file (YAML). Every field has a default;
// see DefaultConfig and docs/configuration in the README.
type Config struct {
	// HostID names this host in envelopes, logs and (later) the fleet.
	// Default: the machine's hostname.
	HostID string `yaml:"host_id"`
	// DataDir holds the vault, the key store and the VM vTPM state.
	DataDir string `yaml:"data_dir"`
	// TPM is the host TPM URI: device:///dev/tpmrm0, swtpm+tcp://H:P or swtpm+unix:///path.
	TPM string `yaml:"tpm"`
	// TPMProfile injects latency per command class: none, ftpm or dtpm (for benchmarks and tests).
	TPMProfile string `yaml:"tpm_profile"`
	// Vault configures the host vault.
	Vault VaultConfig `yaml:"vault"`
	// RunDir holds the VM vTPM sockets while vtpmd runs them.
	RunDir string `yaml:"run_dir"`
	// LogLevel is one of panic, fatal, error, warning, info, debug, trace.
	LogLevel string `yaml:"log_level"`
}

// VaultConfig configures the host vault.
type VaultConfig struct {
	// PCRs is the SHA-256 PCR selection the vault key is sealed to, e.g. "0,2,4,7".
	PCRs string `yaml:"pcrs"`
	// SRKHandle is the persistent handle of the storage root key.
	SRKHandle string `yaml:"srk_handle"`
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	host, _ := os.Hostname()
	return Config{
		HostID:     host,
		DataDir:    "/var/lib/vtpmm",
		TPM:        "device:///dev/tpmrm0",
		TPMProfile: "none",
		Vault:      VaultConfig{PCRs: "0,2,4,7", SRKHandle: "0x81000001"},
		RunDir:     "/run/vtpmm",
		LogLevel:   "info",
	}
}

// LoadConfig reads a YAML file over the defaults. An empty path means defaults only.
func LoadConfig(path string) (Config, error) {
	c := DefaultConfig()
	if path != "" {
		b, err := os.ReadFile(path)
		if err != nil {
			return Config{}, fmt.Errorf("load config: %w", err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(b))
		dec.KnownFields(true)
		if err := dec.Decode(&c); err != nil {
			return Config{}, fmt.Errorf("load config %s: %w: %v", path, ErrConfig, err)
		}
	}
	return c, c.Validate()
}

// Validate checks every field and names the one that is wrong.
func (c Config) Validate() error {
	switch {
	case c.HostID == "" || strings.ContainsAny(c.HostID, " /\\\x00"):
		return fmt.Errorf("%w: host_id %q must be non-empty, without spaces or slashes", ErrConfig, c.HostID)
	case !filepath.IsAbs(c.DataDir):
		return fmt.Errorf("%w: data_dir %q must be an absolute path", ErrConfig, c.DataDir)
	case !filepath.IsAbs(c.RunDir):
		return fmt.Errorf("%w: run_dir %q must be an absolute path", ErrConfig, c.RunDir)
	case strings.ContainsAny(c.DataDir+c.RunDir, ",="):
		return fmt.Errorf("%w: data_dir %q and run_dir %q must not contain ',' or '=' (swtpm options cannot carry them)", ErrConfig, c.DataDir, c.RunDir)
	case c.TPM == "":
		return fmt.Errorf("%w: tpm is empty (e.g. device:///dev/tpmrm0)", ErrConfig)
	}
	if _, err := vtpm.ProfileByName(c.TPMProfile); err != nil {
		return fmt.Errorf("%w: tpm_profile %q: want none, ftpm or dtpm", ErrConfig, c.TPMProfile)
	}
	if _, err := vtpm.ParsePCRSelection(c.Vault.PCRs); err != nil {
		return fmt.Errorf("%w: vault.pcrs: %v", ErrConfig, err)
	}
	if _, err := c.srkHandle(); err != nil {
		return err
	}
	return nil
}

func (c Config) srkHandle() (uint32, error) {
	h, err := strconv.ParseUint(c.Vault.SRKHandle, 0, 32)
	if err != nil || h>>24 != 0x81 {
		return 0, fmt.Errorf("%w: vault.srk_handle %q must be a persistent handle 0x81xxxxxx", ErrConfig, c.Vault.SRKHandle)
	}
	return uint32(h), nil
}

func (c Config) vaultConfig() vtpm.VaultConfig {
	sel, _ := vtpm.ParsePCRSelection(c.Vault.PCRs)
	h, _ := c.srkHandle()
	return vtpm.VaultConfig{Dir: c.DataDir, PCRs: sel, SRKHandle: tpmHandle(h)}
}
