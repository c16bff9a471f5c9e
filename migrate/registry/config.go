package registry

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
)

// Mode selects where the registry lives.
type Mode string

// Modes.
const (
	// ModeNone: no registry. Open returns a nil Registry, the one
	// representation of "disabled": callers keep the peer-to-peer
	// behaviour (static peers, the host's TPM anchor).
	ModeNone Mode = "none"
	// ModeEmbedded: this process runs an etcd member (Config.Embedded).
	ModeEmbedded Mode = "embedded"
	// ModeEtcd: an external etcd cluster (Config.Endpoints).
	ModeEtcd Mode = "etcd"
)

// Defaults.
const (
	DefaultTTL               = 10 * time.Second
	DefaultOpTimeout         = 5 * time.Second
	DefaultMaxTxnOps         = 128  // etcd's own default --max-txn-ops
	DefaultEmbeddedMaxTxnOps = 1024 // what embedded members are started with
	DefaultClusterToken      = "vtpmm"
)

// Config configures a Registry. The YAML names are vtpmd's configuration
// (section "registry"); docs/registry.md shows one snippet per mode.
type Config struct {
	Mode Mode `yaml:"mode"`
	// Host is this host's name: its fleet certificate's CN, which etcd
	// uses as the user name (client-cert auth). Operator tools use the
	// operator certificate's CN (by default "root").
	Host string `yaml:"host"`
	// Prefix of every key (default DefaultPrefix).
	Prefix string `yaml:"prefix"`
	// TTL of the host's liveness lease (default 10 s; etcd rounds up to
	// whole seconds and to its minimum, about 1.5 election timeouts).
	TTL time.Duration `yaml:"ttl"`
	// OpTimeout bounds every registry operation: without quorum a change
	// fails with ErrNoQuorum after at most this long (default 5 s).
	OpTimeout time.Duration `yaml:"op_timeout"`
	// MaxTxnOps is the server's --max-txn-ops; batches that need more
	// operations fail with ErrBatchTooLarge (default 128, or 1024 for
	// embedded members, which are started with it).
	MaxTxnOps int `yaml:"max_txn_ops"`
	// CacheFile, if set, persists this host's last view of the VM records
	// (Cached) across restarts; written atomically with mode 0600.
	CacheFile string `yaml:"cache_file"`
	// NoFollow turns off the watch that keeps the last view current with
	// other hosts' changes (operator tools that only write need none).
	NoFollow bool `yaml:"-"`

	// Endpoints of an external cluster (ModeEtcd), e.g. https://etcd-1:2379.
	Endpoints []string `yaml:"endpoints"`
	// Fleet PKI files: the CA bundle, this host's certificate and key.
	// Embedded members use them for client and peer TLS; clients present
	// them. TLS, when set, replaces them for the client connection.
	CAFile   string      `yaml:"ca_file"`
	CertFile string      `yaml:"cert_file"`
	KeyFile  string      `yaml:"key_file"`
	TLS      *tls.Config `yaml:"-"`

	Embedded Embedded `yaml:"embedded"`

	// StartMember starts the in-process member in ModeEmbedded
	// (member.Start).
	StartMember func(cfg Config) (EmbeddedMember, error) `yaml:"-"`

	Log logrus.FieldLogger `yaml:"-"`
	Now func() time.Time   `yaml:"-"`
}

// Member is one member of an embedded cluster.
type Member struct {
	Name      string `yaml:"name"`       // the host name (its certificate's CN and DNS SAN)
	PeerURL   string `yaml:"peer_url"`   // https://ADDR:2380
	ClientURL string `yaml:"client_url"` // https://ADDR:2379
}

// Embedded configures the in-process etcd member (ModeEmbedded).
type Embedded struct {
	// Name of this member (default Config.Host); it must be in Members.
	Name string `yaml:"name"`
	// DataDir of the member (for vtpmd: DATA/registry). Created 0700.
	DataDir string `yaml:"data_dir"`
	// Members is the initial cluster, this member included.
	Members []Member `yaml:"members"`
	// ClusterState is "new" (bootstrap the cluster, the default) or
	// "existing" (join a cluster after a MemberAdd: replacement).
	ClusterState string `yaml:"cluster_state"`
	// ClusterToken (default DefaultClusterToken) keeps clusters apart.
	ClusterToken string `yaml:"cluster_token"`
	// PeerNames are extra host names allowed on the peer port besides the
	// members (spare hosts that may replace a member). Only certificates
	// of the CA valid for one of these names may talk raft to a member.
	PeerNames []string `yaml:"peer_names"`
	// ListenPeerURL and ListenClientURL are where this member listens
	// for its peers and its clients, when that is not the URL it
	// advertises in Members (its peer_url and client_url): behind a NAT,
	// a load balancer or a proxy (etcd's listen-peer-urls apart from
	// initial-advertise-peer-urls). Default: the advertised URL.
	ListenPeerURL   string `yaml:"listen_peer_url"`
	ListenClientURL string `yaml:"listen_client_url"`
	// HTTPURL is where the member serves etcd's HTTP endpoints (/health,
	// /version); the client URL serves gRPC only. Default
	// https://127.0.0.1:0 (a free loopback port).
	HTTPURL string `yaml:"http_url"`
	// HeartbeatInterval and ElectionTimeout (defaults 100 ms and 1 s, as
	// etcd's). Tests shorten them.
	HeartbeatInterval time.Duration `yaml:"heartbeat_interval"`
	ElectionTimeout   time.Duration `yaml:"election_timeout"`
	// QuotaBackendBytes (default etcd's, 2 GiB).
	QuotaBackendBytes int64 `yaml:"quota_backend_bytes"`
	// CompactionRetention keeps this much history (default 1h).
	CompactionRetention time.Duration `yaml:"compaction_retention"`
	// EtcdLogLevel is the level of etcd's own log lines forwarded to Log
	// (default "warn").
	EtcdLogLevel string `yaml:"etcd_log_level"`
}

// WithDefaults validates the configuration and fills in the defaults (Open
// does it; the member package uses it).
func (c *Config) WithDefaults() (Config, error) { return c.withDefaults() }

func (c *Config) withDefaults() (Config, error) {
	cfg := *c
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if !strings.HasPrefix(cfg.Prefix, "/") || !strings.HasSuffix(cfg.Prefix, "/") {
		return cfg, fmt.Errorf("%w: prefix %q must start and end with /", ErrConfig, cfg.Prefix)
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.TTL < time.Second {
		return cfg, fmt.Errorf("%w: ttl %v is shorter than 1s (etcd leases count seconds)", ErrConfig, cfg.TTL)
	}
	if cfg.OpTimeout == 0 {
		cfg.OpTimeout = DefaultOpTimeout
	}
	if cfg.OpTimeout < 0 {
		return cfg, fmt.Errorf("%w: op_timeout %v", ErrConfig, cfg.OpTimeout)
	}
	if cfg.MaxTxnOps == 0 {
		cfg.MaxTxnOps = DefaultMaxTxnOps
		if cfg.Mode == ModeEmbedded {
			cfg.MaxTxnOps = DefaultEmbeddedMaxTxnOps
		}
	}
	if cfg.MaxTxnOps < 8 {
		return cfg, fmt.Errorf("%w: max_txn_ops %d is below 8", ErrConfig, cfg.MaxTxnOps)
	}
	if err := validHost(cfg.Host); err != nil {
		return cfg, fmt.Errorf("%w: host: %w", ErrConfig, err)
	}
	if cfg.Log == nil {
		l := logrus.New()
		l.SetOutput(discard{})
		cfg.Log = l
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	switch cfg.Mode {
	case ModeEtcd:
		if len(cfg.Endpoints) == 0 {
			return cfg, fmt.Errorf("%w: mode etcd needs endpoints", ErrConfig)
		}
		for _, e := range cfg.Endpoints {
			if err := checkHTTPS(e); err != nil {
				return cfg, fmt.Errorf("%w: endpoint: %w", ErrConfig, err)
			}
		}
	case ModeEmbedded:
		if err := cfg.Embedded.check(cfg.Host); err != nil {
			return cfg, err
		}
		if cfg.CAFile == "" || cfg.CertFile == "" || cfg.KeyFile == "" {
			return cfg, fmt.Errorf("%w: mode embedded needs ca_file, cert_file and key_file (the member serves mutual TLS)", ErrConfig)
		}
	default:
		return cfg, fmt.Errorf("%w: mode %q (want none, embedded or etcd)", ErrConfig, cfg.Mode)
	}
	if cfg.TLS == nil && (cfg.CAFile == "" || cfg.CertFile == "" || cfg.KeyFile == "") {
		return cfg, fmt.Errorf("%w: the registry needs the fleet certificate (ca_file, cert_file, key_file)", ErrConfig)
	}
	return cfg, nil
}

func (e *Embedded) check(host string) error {
	if e.Name == "" {
		e.Name = host
	}
	if e.DataDir == "" {
		return fmt.Errorf("%w: embedded: data_dir is required", ErrConfig)
	}
	if e.ClusterState == "" {
		e.ClusterState = "new"
	}
	if e.ClusterState != "new" && e.ClusterState != "existing" {
		return fmt.Errorf("%w: embedded: cluster_state %q (want new or existing)", ErrConfig, e.ClusterState)
	}
	if e.ClusterToken == "" {
		e.ClusterToken = DefaultClusterToken
	}
	if e.HTTPURL == "" {
		e.HTTPURL = "https://127.0.0.1:0"
	}
	if err := checkHTTPS(e.HTTPURL); err != nil {
		return fmt.Errorf("%w: embedded http_url: %w", ErrConfig, err)
	}
	for name, u := range map[string]string{"listen_peer_url": e.ListenPeerURL, "listen_client_url": e.ListenClientURL} {
		if u == "" {
			continue
		}
		if err := checkHTTPS(u); err != nil {
			return fmt.Errorf("%w: embedded %s: %w", ErrConfig, name, err)
		}
	}
	if e.HeartbeatInterval == 0 {
		e.HeartbeatInterval = 100 * time.Millisecond
	}
	if e.ElectionTimeout == 0 {
		e.ElectionTimeout = time.Second
	}
	if e.ElectionTimeout < 5*e.HeartbeatInterval {
		return fmt.Errorf("%w: embedded: election_timeout must be at least 5 heartbeat intervals", ErrConfig)
	}
	if e.CompactionRetention == 0 {
		e.CompactionRetention = time.Hour
	}
	if e.EtcdLogLevel == "" {
		e.EtcdLogLevel = "warn"
	}
	seen := map[string]bool{}
	self := false
	for _, m := range e.Members {
		if err := validHost(m.Name); err != nil {
			return fmt.Errorf("%w: embedded member: %w", ErrConfig, err)
		}
		if seen[m.Name] {
			return fmt.Errorf("%w: embedded: member %s named twice", ErrConfig, m.Name)
		}
		seen[m.Name] = true
		if err := checkHTTPS(m.PeerURL); err != nil {
			return fmt.Errorf("%w: embedded member %s peer_url: %w", ErrConfig, m.Name, err)
		}
		if err := checkHTTPS(m.ClientURL); err != nil {
			return fmt.Errorf("%w: embedded member %s client_url: %w", ErrConfig, m.Name, err)
		}
		self = self || m.Name == e.Name
	}
	if !self {
		return fmt.Errorf("%w: embedded: this member %q is not among the members", ErrConfig, e.Name)
	}
	for _, n := range e.PeerNames {
		if err := validHost(n); err != nil {
			return fmt.Errorf("%w: embedded peer_names: %w", ErrConfig, err)
		}
	}
	return nil
}

// Self returns this member's entry of Members.
func (e *Embedded) Self() Member {
	for _, m := range e.Members {
		if m.Name == e.Name {
			return m
		}
	}
	return Member{}
}

func checkHTTPS(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("%q: %v", s, err)
	}
	if u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") {
		return fmt.Errorf("%q: want https://HOST:PORT (the registry speaks TLS only)", s)
	}
	return nil
}

// clientTLS returns the client TLS configuration: Config.TLS, or one built
// from the fleet PKI files (the server name comes from each endpoint).
func (c *Config) clientTLS() (*tls.Config, error) {
	if c.TLS != nil {
		return c.TLS.Clone(), nil
	}
	caPEM, err := os.ReadFile(c.CAFile)
	if err != nil {
		return nil, fmt.Errorf("%w: ca_file: %v", ErrConfig, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%w: ca_file %s holds no certificate", ErrConfig, c.CAFile)
	}
	cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("%w: cert_file/key_file: %v", ErrConfig, err)
	}
	return &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, Certificates: []tls.Certificate{cert}}, nil
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }
