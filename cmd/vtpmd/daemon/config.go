package daemon

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/vtpm/host"
)

// Config is vtpmd's configuration file (YAML). Every field has a default
// (DefaultConfig); the README's Configuration section and
// packaging/vtpmd.yaml describe each one. The host's own part (host_id,
// data_dir, tpm, vault, ...) is host.Config, inline.
type Config struct {
	host.Config `yaml:",inline"`
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
	// Hypervisor is this host's hypervisor URI (libvirt: qemu:///system).
	// Empty: no hypervisor (hypervisor.None); vtpmd then runs VM vTPMs
	// itself and cannot migrate.
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

// AttestationConfig is the verifier side of this host.
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

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		Config:      host.DefaultConfig(),
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
	if err := c.Config.Validate(); err != nil {
		return err
	}
	if _, err := c.evidenceMaxAge(); err != nil {
		return err
	}
	for h, addr := range c.Peers {
		if h == c.HostID || h == "" || addr == "" {
			return fmt.Errorf("%w: peers: %q -> %q (a peer needs a name other than host_id, and an address)", ErrConfig, h, addr)
		}
	}
	return nil
}

func (c Config) evidenceMaxAge() (time.Duration, error) {
	if c.Attestation.EvidenceMaxAge == "" {
		return migrate.DefaultEvidenceMaxAge, nil
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
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("%w: peers.%s: %v", ErrConfig, peer, err)
	}
	return "qemu+tcp://" + net.JoinHostPort(h, "16509") + "/system", nil
}

// AdminSocketPath is AdminSocket or its default.
func (c Config) AdminSocketPath() string {
	if c.AdminSocket != "" {
		return c.AdminSocket
	}
	return c.Layout().AdminSocket()
}

// AuditLogPath is AuditLog or its default.
func (c Config) AuditLogPath() string {
	if c.AuditLog != "" {
		return c.AuditLog
	}
	return c.Layout().AuditLog()
}
