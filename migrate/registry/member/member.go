// Package member runs this host's etcd member in-process for the fleet
// registry's embedded mode (go.etcd.io/etcd/server/v3/embed, the way k3s
// embeds etcd), and restores a member's data directory from a snapshot.
// It is apart from package registry so that only the daemon links etcd's
// server: cmd/vtpmd sets registry.Config.StartMember = member.Start.
package member

import (
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/migrate/registry"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
)

// Start starts this host's etcd member in-process (registry.Config
// .StartMember; cfg has its defaults filled by registry.Open), the way k3s
// embeds etcd: client and peer ports serve mutual TLS with the fleet PKI
// (client-cert-auth, so etcd takes the user name from the certificate's
// CN), and the peer port accepts only certificates valid for a member's
// (or a spare's) host name. It listens on Embedded.ListenPeerURL and
// ListenClientURL when they are set (a proxy, a NAT: the members dial the
// advertised URLs of Members). It returns once the listeners serve; it does
// not wait for quorum (Client.Ready does).
func Start(cfg registry.Config) (registry.EmbeddedMember, error) {
	e, err := start(cfg)
	if err != nil {
		return nil, err
	}
	return &etcdMember{e: e}, nil
}

type etcdMember struct{ e *embed.Etcd }

func (m *etcdMember) Ready() <-chan struct{} { return m.e.Server.ReadyNotify() }
func (m *etcdMember) Err() <-chan error      { return m.e.Err() }

// Close stops the member. etcd's own Close waits for its client servers,
// and each of those waits until the member is ready or stopping; a member
// that never became ready (it never saw a quorum, e.g. when vtpmd's start
// failed before the other members came up) would make Close wait forever.
// Such a member is stopped first, which its servers see.
func (m *etcdMember) Close() {
	select {
	case <-m.e.Server.ReadyNotify():
	default:
		m.e.Server.Stop()
	}
	m.e.Close()
}

// Crash stops the member without coordination with its peers, as a crash
// would: a leader does not hand its leadership over first (etcd's graceful
// stop keeps the cluster's quorum for up to its request timeout while it
// tries to). The listeners and files are then closed as by Close.
func (m *etcdMember) Crash() {
	m.e.Server.HardStop()
	m.e.Close()
}

func start(cfg registry.Config) (*embed.Etcd, error) {
	log := cfg.Log
	if log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		log = l
	}
	em := cfg.Embedded
	self := em.Self()
	ec := embed.NewConfig()
	ec.Name = em.Name
	ec.Dir = em.DataDir
	pu, err := url.Parse(self.PeerURL)
	if err != nil {
		return nil, fmt.Errorf("%w: peer_url: %v", registry.ErrConfig, err)
	}
	cu, err := url.Parse(self.ClientURL)
	if err != nil {
		return nil, fmt.Errorf("%w: client_url: %v", registry.ErrConfig, err)
	}
	lpu, lcu := pu, cu // listen where advertised, unless told otherwise
	if em.ListenPeerURL != "" {
		if lpu, err = url.Parse(em.ListenPeerURL); err != nil {
			return nil, fmt.Errorf("%w: listen_peer_url: %v", registry.ErrConfig, err)
		}
	}
	if em.ListenClientURL != "" {
		if lcu, err = url.Parse(em.ListenClientURL); err != nil {
			return nil, fmt.Errorf("%w: listen_client_url: %v", registry.ErrConfig, err)
		}
	}
	ec.ListenPeerUrls, ec.AdvertisePeerUrls = []url.URL{*lpu}, []url.URL{*pu}
	ec.ListenClientUrls, ec.AdvertiseClientUrls = []url.URL{*lcu}, []url.URL{*cu}
	// HTTP (health, version) on its own listener, so that the client URL
	// serves gRPC natively: no gRPC-through-net/http handler, whose
	// behaviour depends on the gRPC version and which answers requests
	// racing a shutdown with malformed responses.
	hu, err := url.Parse(em.HTTPURL)
	if err != nil {
		return nil, fmt.Errorf("%w: http_url: %v", registry.ErrConfig, err)
	}
	ec.ListenClientHttpUrls = []url.URL{*hu}
	initial := make([]string, 0, len(em.Members))
	names := make([]string, 0, len(em.Members)+len(em.PeerNames))
	for _, m := range em.Members {
		initial = append(initial, m.Name+"="+m.PeerURL)
		names = append(names, m.Name)
	}
	names = append(names, em.PeerNames...)
	ec.InitialCluster = strings.Join(initial, ",")
	ec.ClusterState = em.ClusterState
	ec.InitialClusterToken = em.ClusterToken
	ec.ClientTLSInfo = transport.TLSInfo{
		CertFile:       cfg.CertFile,
		KeyFile:        cfg.KeyFile,
		TrustedCAFile:  cfg.CAFile,
		ClientCertAuth: true,
	}
	ec.PeerTLSInfo = transport.TLSInfo{
		CertFile:         cfg.CertFile,
		KeyFile:          cfg.KeyFile,
		TrustedCAFile:    cfg.CAFile,
		ClientCertAuth:   true,
		AllowedHostnames: names,
	}
	ec.TlsMinVersion = "TLS1.3" // as every vtpmm TLS endpoint
	ec.TickMs = uint(em.HeartbeatInterval.Milliseconds())
	ec.ElectionMs = uint(em.ElectionTimeout.Milliseconds())
	ec.MaxTxnOps = uint(cfg.MaxTxnOps)
	if em.QuotaBackendBytes > 0 {
		ec.QuotaBackendBytes = em.QuotaBackendBytes
	}
	ec.AutoCompactionMode = "periodic"
	ec.AutoCompactionRetention = em.CompactionRetention.String()
	ec.EnableGRPCGateway = false // gRPC only: no HTTP/JSON surface
	ec.Logger = "zap"
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(registry.ZapLogger(log.WithField("member", em.Name), em.EtcdLogLevel))
	if err := os.MkdirAll(em.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("registry: member data dir: %w", err)
	}
	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("registry: start etcd member %s: %w", em.Name, err)
	}
	return e, nil
}
