package host

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/internal/ids"
	"github.com/vtpmm/vtpmm/vtpm"
)

// Config is the host part of vtpmd's configuration file (YAML; the daemon's
// configuration embeds it inline).
type Config struct {
	// HostID names this host in envelopes, logs, certificates and to its peers.
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
	}
}

// Validate checks every field and names the one that is wrong.
func (c Config) Validate() error {
	switch {
	case !ids.IsHostID(c.HostID):
		return fmt.Errorf("%w: host_id %q must be %s", ErrConfig, c.HostID, ids.HostIDRule)
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
	if _, err := c.SRKHandle(); err != nil {
		return err
	}
	return nil
}

// SRKHandle is the storage root key's persistent handle (vault.srk_handle).
func (c Config) SRKHandle() (tpm2.TPMHandle, error) {
	h, err := strconv.ParseUint(c.Vault.SRKHandle, 0, 32)
	if err != nil || h>>24 != 0x81 {
		return 0, fmt.Errorf("%w: vault.srk_handle %q must be a persistent handle 0x81xxxxxx", ErrConfig, c.Vault.SRKHandle)
	}
	return tpm2.TPMHandle(h), nil
}

func (c Config) vaultConfig() vtpm.VaultConfig {
	sel, _ := vtpm.ParsePCRSelection(c.Vault.PCRs)
	h, _ := c.SRKHandle()
	return vtpm.VaultConfig{Dir: c.DataDir, PCRs: sel, SRKHandle: h}
}

// Layout is where a host keeps its files (etcd's datadir, as functions):
// one place knows every path below data_dir and run_dir.
type Layout struct{ DataDir, RunDir string }

// Layout is the configuration's layout.
func (c Config) Layout() Layout { return Layout{DataDir: c.DataDir, RunDir: c.RunDir} }

// HostRecord is the file that ties the data directory to a host ID.
func (l Layout) HostRecord() string { return filepath.Join(l.DataDir, "host.json") }

// Ledger is the migration ledger (bbolt).
func (l Layout) Ledger() string { return filepath.Join(l.DataDir, "ledger.db") }

// AuditLog is the default audit log.
func (l Layout) AuditLog() string { return filepath.Join(l.DataDir, "audit.log") }

// VMs is the directory of the VM records.
func (l Layout) VMs() string { return filepath.Join(l.DataDir, "vms") }

// VM is one VM's directory.
func (l Layout) VM(id string) string { return filepath.Join(l.VMs(), id) }

// VMRecord is one VM's record (vm.json).
func (l Layout) VMRecord(id string) string { return filepath.Join(l.VM(id), "vm.json") }

// VMState is one VM's swtpm state directory (TPM 2.0).
func (l Layout) VMState(id string) string { return filepath.Join(l.VM(id), "tpm2") }

// SwtpmCA is the directory of the local CA that signs the vTPMs' EK certificates.
func (l Layout) SwtpmCA() string { return filepath.Join(l.DataDir, "swtpm-localca") }

// VMSockets is the directory of a running vTPM's sockets.
func (l Layout) VMSockets(id string) string { return filepath.Join(l.RunDir, id) }

// AdminSocket is the default admin socket.
func (l Layout) AdminSocket() string { return filepath.Join(l.RunDir, "vtpmd.sock") }
