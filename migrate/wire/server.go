package wire

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/vtpmm/vtpmm/internal/pki"
	"github.com/vtpmm/vtpmm/migrate"
)

// ServiceName is the gRPC service of the agent wire.
const ServiceName = "vtpmm.migrate.v1.Agent"

// Method names of the service (full names are "/" + ServiceName + "/" + name).
const (
	MethodEvidence = "Evidence"
	MethodPrepare  = "Prepare"
	MethodFinish   = "Finish"
	MethodStatus   = "Status"
	MethodIdentity = "Identity"
	MethodActivate = "Activate"
	MethodPull     = "Pull"
	// MethodRestore carries a restore from escrow (migrate.RestoreRequest),
	// relayed by the operator's host.
	MethodRestore = "Restore"
	// MethodReplicate carries a standby replica refresh
	// (migrate.ReplicaRequest) from a VM's owner to its standby.
	MethodReplicate = "Replicate"
)

// FullMethod returns the full gRPC method name ("/vtpmm.migrate.v1.Agent/Prepare").
func FullMethod(name string) string { return "/" + ServiceName + "/" + name }

// MaxMessageSize bounds every request and response on the wire, in both
// directions (evidence with an event log is the largest message).
const MaxMessageSize = 8 << 20

// DefaultShutdownGrace is how long Serve waits for calls in flight after
// its context ends before it cuts the connections.
const DefaultShutdownGrace = 10 * time.Second

// agentService is the HandlerType of the service descriptor.
type agentService interface {
	peerHost(ctx context.Context) (string, error)
}

// serviceDesc is the hand-written descriptor of vtpmm.migrate.v1.Agent:
// eight unary methods, JSON messages (no protobuf schema).
func serviceDesc() *grpc.ServiceDesc {
	return &grpc.ServiceDesc{
		ServiceName: ServiceName,
		HandlerType: (*agentService)(nil),
		Methods: []grpc.MethodDesc{
			{MethodName: MethodEvidence, Handler: handler(MethodEvidence,
				func(b []byte) (*migrate.EvidenceRequest, error) {
					return migrate.DecodeStrict[migrate.EvidenceRequest]("evidence", b)
				},
				func(r *migrate.EvidenceRequest) string { return r.Source },
				migrate.Peer.Evidence)},
			{MethodName: MethodPrepare, Handler: handler(MethodPrepare, migrate.DecodePrepare,
				func(r *migrate.PrepareRequest) string { return r.Source },
				migrate.Peer.Prepare)},
			{MethodName: MethodFinish, Handler: handler(MethodFinish, migrate.DecodeFinish,
				func(r *migrate.FinishRequest) string { return r.Source },
				migrate.Peer.Finish)},
			{MethodName: MethodStatus, Handler: handler(MethodStatus,
				func(b []byte) (*migrate.StatusRequest, error) {
					return migrate.DecodeStrict[migrate.StatusRequest]("status", b)
				},
				func(r *migrate.StatusRequest) string { return r.From },
				migrate.Peer.Status)},
			{MethodName: MethodIdentity, Handler: handler(MethodIdentity,
				func(b []byte) (*migrate.IdentityRequest, error) {
					return migrate.DecodeStrict[migrate.IdentityRequest]("identity", b)
				},
				func(r *migrate.IdentityRequest) string { return r.From },
				migrate.Peer.Identity)},
			{MethodName: MethodActivate, Handler: handler(MethodActivate,
				func(b []byte) (*migrate.ActivateRequest, error) {
					return migrate.DecodeStrict[migrate.ActivateRequest]("activate", b)
				},
				func(r *migrate.ActivateRequest) string { return r.From },
				migrate.Peer.Activate)},
			{MethodName: MethodPull, Handler: handler(MethodPull, migrate.DecodePull,
				func(r *migrate.PullRequest) string { return r.Dest },
				migrate.Peer.Pull)},
			{MethodName: MethodRestore, Handler: handler(MethodRestore, migrate.DecodeRestore,
				func(r *migrate.RestoreRequest) string { return r.Prepare.Source },
				restore)},
			{MethodName: MethodReplicate, Handler: handler(MethodReplicate, migrate.DecodeReplica,
				func(r *migrate.ReplicaRequest) string { return r.Owner },
				replicate)},
		},
		Streams:  []grpc.StreamDesc{},
		Metadata: "vtpmm/migrate/v1/agent (hand-written, JSON codec)",
	}
}

// restore calls the node's Restore, if it takes restores.
func restore(p migrate.Peer, ctx context.Context, r *migrate.RestoreRequest) (*migrate.PrepareResponse, error) {
	rs, ok := p.(migrate.Restorer)
	if !ok {
		return nil, status.Error(codes.Unimplemented, "this agent takes no restores")
	}
	return rs.Restore(ctx, r)
}

// replicate calls the node's Replicate, if it takes replicas.
func replicate(p migrate.Peer, ctx context.Context, r *migrate.ReplicaRequest) (*migrate.ReplicaResponse, error) {
	rp, ok := p.(migrate.Replicator)
	if !ok {
		return nil, status.Error(codes.Unimplemented, "this agent takes no replicas")
	}
	return rp.Replicate(ctx, r)
}

// Server serves a migrate.Peer (a *migrate.Node) to other agents over
// gRPC with mutual TLS.
type Server struct {
	node         migrate.Peer
	log          logrus.FieldLogger
	grace        time.Duration
	interceptors []grpc.UnaryServerInterceptor
	gs           *grpc.Server
	err          error
}

// ServerOption configures a Server.
type ServerOption func(*Server)

// WithUnaryInterceptor adds an interceptor. Interceptors see every request
// that passed the strict decoder, as its decoded *migrate.XRequest, before
// the authorization check; the handler they call returns status errors.
func WithUnaryInterceptor(i grpc.UnaryServerInterceptor) ServerOption {
	return func(s *Server) { s.interceptors = append(s.interceptors, i) }
}

// WithShutdownGrace sets how long Serve waits for calls in flight when its
// context ends (default DefaultShutdownGrace).
func WithShutdownGrace(d time.Duration) ServerOption {
	return func(s *Server) { s.grace = d }
}

// NewServer builds the agent server for node. tlsConfig must require and
// verify client certificates (pki.ServerTLS does); otherwise Serve fails.
// log may be nil.
func NewServer(node migrate.Peer, tlsConfig *tls.Config, log logrus.FieldLogger, opts ...ServerOption) *Server {
	if log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		log = l
	}
	s := &Server{node: node, log: log.WithField("component", "wire"), grace: DefaultShutdownGrace}
	for _, o := range opts {
		o(s)
	}
	switch {
	case node == nil:
		s.err = errors.New("wire: server: no node")
		return s
	case tlsConfig == nil:
		s.err = errors.New("wire: server: no TLS configuration")
		return s
	case tlsConfig.ClientAuth != tls.RequireAndVerifyClientCert:
		s.err = fmt.Errorf("wire: server: TLS configuration does not require and verify client certificates (ClientAuth %v)", tlsConfig.ClientAuth)
		return s
	}
	s.gs = grpc.NewServer(
		grpc.Creds(credentials.NewTLS(tlsConfig)),
		grpc.ForceServerCodec(jsonCodec{}),
		grpc.MaxRecvMsgSize(MaxMessageSize),
		grpc.MaxSendMsgSize(MaxMessageSize),
		grpc.ConnectionTimeout(10*time.Second),
		grpc.MaxConcurrentStreams(128),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionIdle: 15 * time.Minute,
			Time:              time.Minute,
			Timeout:           20 * time.Second,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 20 * time.Second}),
		grpc.ChainUnaryInterceptor(s.interceptors...),
	)
	s.gs.RegisterService(serviceDesc(), s)
	return s
}

// Serve accepts connections on lis until ctx ends, then stops gracefully:
// calls in flight get the shutdown grace, after which the remaining
// connections are closed. It returns nil after a shutdown by ctx, and the
// listener's error otherwise. lis is closed when Serve returns.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	if s.err != nil {
		lis.Close()
		return s.err
	}
	addr := lis.Addr().String()
	s.log.WithField("addr", addr).Info("agent wire listening")
	errc := make(chan error, 1)
	go func() { errc <- s.gs.Serve(lis) }()
	select {
	case err := <-errc:
		return fmt.Errorf("wire: serve %s: %w", addr, err)
	case <-ctx.Done():
	}
	done := make(chan struct{})
	go func() {
		s.gs.GracefulStop()
		close(done)
	}()
	t := time.NewTimer(s.grace)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		s.log.WithField("addr", addr).Warn("agent wire: calls still in flight after the shutdown grace; closing connections")
		s.gs.Stop()
		<-done
	}
	<-errc
	s.log.WithField("addr", addr).Info("agent wire stopped")
	return nil
}

// peerHost returns the host name of the call's verified client certificate.
func (s *Server) peerHost(ctx context.Context) (string, error) {
	p, ok := peer.FromContext(ctx)
	if !ok || p.AuthInfo == nil {
		return "", denied(codes.Unauthenticated, "no transport security information")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return "", denied(codes.Unauthenticated, "not a TLS connection")
	}
	h, err := pki.PeerHost(ti.State)
	if err != nil {
		return "", denied(codes.Unauthenticated, err.Error())
	}
	return h, nil
}

// authorize checks that the verified client is the request's claimed sender.
func (s *Server) authorize(ctx context.Context, claimed string) (string, error) {
	h, err := s.peerHost(ctx)
	if err != nil {
		return "", err
	}
	if h != claimed {
		return h, denied(codes.PermissionDenied, fmt.Sprintf("client certificate is for host %q but the request claims to come from %q", h, claimed))
	}
	return h, nil
}

// handler builds the MethodHandler of one method: receive the raw bytes,
// decode them strictly, run the interceptors, authorize, call the node and
// map its error.
func handler[Req, Resp any](method string, decode func([]byte) (*Req, error), sender func(*Req) string,
	call func(migrate.Peer, context.Context, *Req) (*Resp, error)) grpc.MethodHandler {
	return func(srv any, ctx context.Context, dec func(any) error, icpt grpc.UnaryServerInterceptor) (any, error) {
		s := srv.(*Server)
		start := time.Now()
		var raw rawMessage
		if err := dec(&raw); err != nil {
			return nil, err
		}
		req, err := decode(raw)
		if err != nil {
			err = toStatus(err)
			s.logCall(ctx, method, "", start, err)
			return nil, err
		}
		h := func(ctx context.Context, r any) (any, error) {
			req, ok := r.(*Req)
			if !ok {
				return nil, status.Errorf(codes.Internal, "wire: interceptor changed the request type to %T", r)
			}
			who, err := s.authorize(ctx, sender(req))
			if err != nil {
				s.logCall(ctx, method, who, start, err)
				return nil, err
			}
			resp, err := call(s.node, ctx, req)
			err = toStatus(err)
			s.logCall(ctx, method, who, start, err)
			if err != nil {
				return nil, err
			}
			return resp, nil
		}
		if icpt == nil {
			return h(ctx, req)
		}
		return icpt(ctx, req, &grpc.UnaryServerInfo{Server: s, FullMethod: FullMethod(method)}, h)
	}
}

func (s *Server) logCall(ctx context.Context, method, who string, start time.Time, err error) {
	f := logrus.Fields{"method": method, "duration": time.Since(start).Round(time.Millisecond)}
	if who != "" {
		f["peer"] = who
	} else if p, ok := peer.FromContext(ctx); ok {
		f["addr"] = p.Addr.String()
	}
	if err == nil {
		s.log.WithFields(f).Debug("agent call")
		return
	}
	st := status.Convert(err)
	f["code"] = st.Code().String()
	s.log.WithFields(f).WithError(err).Info("agent call failed")
}
