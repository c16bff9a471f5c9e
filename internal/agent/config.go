package agent

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/vtpmm/vtpmm/vtpm"
)

// Config is vtpmd's configuration file (YAML). Every field has a default
// (DefaultConfig); the README's Configuration section and
// packaging/vtpmd.yaml describe each one.
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
	// LogLevel is one of panic, fatal, error, warning, info, debug, trace.
	LogLevel string `yaml:"log_level"`

	// Listen is the agent wire address (gRPC over mTLS), e.g. 0.0.0.0:7450.
	Listen string `yaml:"listen"`
	// AdminSocket is the local API for vtpmctl (HTTP over a unix socket,
	// mode 0600). Default: RUN_DIR/vtpmd.sock.
	AdminSocket string `yaml:"admin_socket"`
	// Peers maps other hosts' IDs to their wire addresses.
	Peers map[string]string `yaml:"peers"`
	// TLS holds the agent's mTLS files (vtpmctl pki init / issue).
	TLS TLSConfig `yaml:"tls"`
	// Attestation configures how destinations are verified.
	Attestation AttestationConfig `yaml:"attestation"`
	// MetricsListen serves Prometheus /metrics (empty: off).
	MetricsListen string `yaml:"metrics_listen"`
	// AuditLog is the hash-chained audit log (default DATA_DIR/audit.log).
	AuditLog string `yaml:"audit_log"`
	// EventLog is this host's TCG event log, sent with its evidence.
	EventLog string `yaml:"event_log"`
	// Hypervisor is this host's libvirt URI (e.g. qemu:///system). Empty:
	// no hypervisor; vtpmd then runs VM vTPMs itself and cannot migrate.
	Hypervisor string `yaml:"hypervisor"`
	// PeerHypervisors maps peers to the libvirt URI their migrations go to.
	// Default: qemu+tcp://<host of the peer's address>/system.
	PeerHypervisors map[string]string `yaml:"peer_hypervisors"`
}

// TLSConfig names the mTLS files of the agent wire.
type TLSConfig struct {
	CA   string `yaml:"ca"`
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

// AttestationConfig is the verifier side of this agent.
type AttestationConfig struct {
	// Policy is the attest policy file (YAML or JSON; vtpmctl eventlog golden).
	Policy string `yaml:"policy"`
	// Roots are directories of trusted EK roots and intermediates.
	Roots []string `yaml:"roots"`
	// Enrollments is the JSON file of activated (EK, AK) pairs.
	Enrollments string `yaml:"enrollments"`
	// EvidenceMaxAge: verified evidence of a destination is reused for this
	// long (Go duration; default 60s; "0s" disables reuse).
	EvidenceMaxAge string `yaml:"evidence_max_age"`
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
		HostID:      host,
		DataDir:     "/var/lib/vtpmm",
		TPM:         "device:///dev/tpmrm0",
		TPMProfile:  "none",
		Vault:       VaultConfig{PCRs: "0,2,4,7", SRKHandle: "0x81000001"},
		RunDir:      "/run/vtpmm",
		LogLevel:    "info",
		Listen:      "127.0.0.1:7450",
		EventLog:    "/sys/kernel/security/tpm0/binary_bios_measurements",
		Attestation: AttestationConfig{EvidenceMaxAge: "60s"},
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
	if _, err := c.evidenceMaxAge(); err != nil {
		return err
	}
	for host, addr := range c.Peers {
		if host == c.HostID || host == "" || addr == "" {
			return fmt.Errorf("%w: peers: %q -> %q (a peer needs a name other than host_id, and an address)", ErrConfig, host, addr)
		}
	}
	return nil
}

func (c Config) evidenceMaxAge() (time.Duration, error) {
	if c.Attestation.EvidenceMaxAge == "" {
		return migrateDefaultMaxAge, nil
	}
	d, err := time.ParseDuration(c.Attestation.EvidenceMaxAge)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("%w: attestation.evidence_max_age %q is not a duration >= 0 (e.g. 60s)", ErrConfig, c.Attestation.EvidenceMaxAge)
	}
	if d == 0 {
		return -1, nil // reuse disabled
	}
	return d, nil
}

// PeerHypervisorURI is the libvirt URI migrations to peer go to.
func (c Config) PeerHypervisorURI(peer string) (string, error) {
	if u, ok := c.PeerHypervisors[peer]; ok {
		return u, nil
	}
	addr, ok := c.Peers[peer]
	if !ok {
		return "", fmt.Errorf("%w: %q is not in peers", ErrConfig, peer)
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("%w: peers.%s: %v", ErrConfig, peer, err)
	}
	return "qemu+tcp://" + net.JoinHostPort(host, "16509") + "/system", nil
}

// AdminSocketPath is AdminSocket or its default.
func (c Config) AdminSocketPath() string {
	if c.AdminSocket != "" {
		return c.AdminSocket
	}
	return filepath.Join(c.RunDir, "vtpmd.sock")
}

// auditLogPath is AuditLog or its default.
func (c Config) auditLogPath() string {
	if c.AuditLog != "" {
		return c.AuditLog
	}
	return filepath.Join(c.DataDir, "audit.log")
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
