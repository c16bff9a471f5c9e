package daemon

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/escrow"
	"github.com/vtpmm/vtpmm/migrate/registry"
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
	// Advertise is the agent wire address other hosts dial, as this host
	// registers it in the fleet registry (default: the bound listen
	// address, which must then not be a wildcard).
	Advertise string `yaml:"advertise"`
	// Peers maps other hosts' IDs to their wire addresses. With a fleet
	// registry, peers are discovered from it (their registered addresses)
	// and this map, if set, only overrides addresses.
	Peers map[string]string `yaml:"peers"`
	// Registry is the fleet registry (docs/registry.md): mode none (the
	// default: peer-to-peer, static peers, per-pair enrolment), embedded
	// (an etcd member inside vtpmd) or etcd (an external cluster). The
	// TLS files default to the tls section's, host to host_id, the
	// embedded member's data_dir to DATA_DIR/registry and cache_file to
	// DATA_DIR/registry-view.json.
	Registry registry.Config `yaml:"registry"`
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
	// Escrow names the offline custodians of the backup bundles and the
	// threshold k of them needed to restore (docs/escrow.md). Empty: no
	// backups (vtpmctl backup is refused).
	Escrow escrow.Config `yaml:"escrow"`
	// Backup is the periodic backup of every VM this host owns (needs
	// escrow): one bundle per VM every interval in dir, older ones pruned.
	Backup BackupConfig `yaml:"backup"`
	// Standby configures standby replicas and failover (docs/failover.md;
	// needs a fleet registry).
	Standby StandbyConfig `yaml:"standby"`
}

// BackupConfig schedules backups (docs/escrow.md, docs/recovery.md).
type BackupConfig struct {
	// Dir receives the bundles, DIR/<vm-uuid>/<generation>-<time>.vtpmbundle
	// (mode 0600, directories 0700); also the default of 'vtpmctl backup'.
	Dir string `yaml:"dir"`
	// Interval between two backups of every owned VM (Go duration, e.g.
	// 6h). Empty or 0: no schedule ('vtpmctl backup' still works).
	Interval string `yaml:"interval"`
	// Keep is how many bundles are kept per VM (default 7): older ones are
	// removed after each backup, but never the newest bundle of the VM's
	// current generation nor any of a higher one (escrow.Retain).
	Keep int `yaml:"keep"`
}

// DefaultBackupKeep is backup.keep's default.
const DefaultBackupKeep = 7

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
	// Enrollments is the JSON file of activated (EK, AK) pairs (registry
	// mode none; with a fleet registry every host trusts its enrolment
	// records instead).
	Enrollments string `yaml:"enrollments"`
	// AKRoots are directories of trusted AK certificate roots: a host
	// presenting an AK certificate is enrolled on it when the policy's
	// enrollment allows ak-certificate.
	AKRoots []string `yaml:"ak_roots"`
	// AKCert is this host's own AK certificate (a file), presented when
	// it is enrolled and carried in its evidence.
	AKCert string `yaml:"ak_cert"`
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
	if err := c.validateBackup(); err != nil {
		return err
	}
	if err := c.Standby.validate(); err != nil {
		return err
	}
	if c.RegistryMode() != registry.ModeNone {
		rc := c.RegistryConfig()
		if _, err := rc.WithDefaults(); err != nil {
			return fmt.Errorf("%w: registry: %w", ErrConfig, err)
		}
		if c.TLS.CA == "" {
			return fmt.Errorf("%w: registry mode %s needs the agent wire (tls): peers reach each other over it", ErrConfig, rc.Mode)
		}
	}
	return nil
}

// RegistryMode is registry.mode, ModeNone when empty.
func (c Config) RegistryMode() registry.Mode {
	if c.Registry.Mode == "" {
		return registry.ModeNone
	}
	return c.Registry.Mode
}

// RegistryConfig is the registry section with its defaults from the rest
// of the configuration: host_id, the tls files, the data directory.
func (c Config) RegistryConfig() registry.Config {
	rc := c.Registry
	if rc.Mode == "" {
		rc.Mode = registry.ModeNone
	}
	if rc.Host == "" {
		rc.Host = c.HostID
	}
	if rc.CAFile == "" && rc.CertFile == "" && rc.KeyFile == "" {
		rc.CAFile, rc.CertFile, rc.KeyFile = c.TLS.CA, c.TLS.Cert, c.TLS.Key
	}
	if rc.Mode == registry.ModeEmbedded && rc.Embedded.DataDir == "" {
		rc.Embedded.DataDir = c.Layout().Registry()
	}
	if rc.CacheFile == "" {
		rc.CacheFile = c.Layout().RegistryView()
	}
	return rc
}

// RegistryEndpoints are the client URLs of the fleet registry: the
// external cluster's, or every embedded member's.
func (c Config) RegistryEndpoints() []string {
	if c.Registry.Mode != registry.ModeEmbedded {
		return c.Registry.Endpoints
	}
	var eps []string
	for _, m := range c.Registry.Embedded.Members {
		eps = append(eps, m.ClientURL)
	}
	return eps
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
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return "", fmt.Errorf("%w: peers.%s: %v", ErrConfig, peer, err)
	}
	return hypervisorURI(addr), nil
}

// hypervisorURI is the default libvirt URI of a host whose agent wire
// listens at addr (HOST:PORT): qemu+tcp://HOST:16509/system.
func hypervisorURI(addr string) string {
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		h = addr
	}
	return "qemu+tcp://" + net.JoinHostPort(h, "16509") + "/system"
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

// backupInterval is backup.interval (0: no schedule).
func (c Config) backupInterval() (time.Duration, error) {
	if c.Backup.Interval == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(c.Backup.Interval)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("%w: backup.interval %q is not a duration >= 0 (e.g. 6h)", ErrConfig, c.Backup.Interval)
	}
	return d, nil
}

// validateBackup checks the escrow and backup sections: a schedule needs
// a directory and custodians; the custodians' policy is built (and its
// recipients parsed) when the daemon starts.
func (c Config) validateBackup() error {
	iv, err := c.backupInterval()
	if err != nil {
		return err
	}
	if c.Backup.Keep < 0 {
		return fmt.Errorf("%w: backup.keep %d (want >= 1, or 0 for the default %d)", ErrConfig, c.Backup.Keep, DefaultBackupKeep)
	}
	if iv > 0 && c.Backup.Dir == "" {
		return fmt.Errorf("%w: backup.interval is set but backup.dir is empty", ErrConfig)
	}
	if iv > 0 && len(c.Escrow.Custodians) == 0 {
		return fmt.Errorf("%w: backup.interval is set but escrow has no custodians: bundles need recipients to be sealed for", ErrConfig)
	}
	return nil
}
