// Package wire is the agent wire: gRPC over mTLS between vtpmd agents,
// carrying the migration protocol of package migrate (migrate.Peer).
//
// # Service
//
// One hand-written gRPC service (no protoc, no generated code),
// vtpmm.migrate.v1.Agent, with seven unary methods that mirror
// migrate.Peer:
//
//	/vtpmm.migrate.v1.Agent/Evidence  migrate.EvidenceRequest -> migrate.EvidenceResponse
//	/vtpmm.migrate.v1.Agent/Prepare   migrate.PrepareRequest  -> migrate.PrepareResponse
//	/vtpmm.migrate.v1.Agent/Finish    migrate.FinishRequest   -> migrate.FinishResponse
//	/vtpmm.migrate.v1.Agent/Status    migrate.StatusRequest   -> migrate.StatusResponse
//	/vtpmm.migrate.v1.Agent/Identity  migrate.IdentityRequest -> migrate.IdentityResponse
//	/vtpmm.migrate.v1.Agent/Activate  migrate.ActivateRequest -> migrate.ActivateResponse
//	/vtpmm.migrate.v1.Agent/Pull      migrate.PullRequest     -> migrate.PullResponse
//
// NewServer serves a migrate.Peer (a *migrate.Node); NewClient gives a
// Client whose Dial is a migrate.Dialer whose Peers call it, over one cached
// *grpc.ClientConn per host.
//
// # Codec
//
// Messages are the JSON encodings of package migrate's structs (content
// type application/grpc+json). The codec is handed to each server
// (grpc.ForceServerCodec) and each connection (grpc.ForceCodec); nothing is
// registered globally. On the server the codec only copies the request's
// bytes; the handler decodes them with the strict decoders
// (migrate.DecodePrepare, migrate.DecodeFinish, migrate.DecodePull, and for the others
// a decoder with the same rules: no unknown fields, no trailing data), so
// untrusted input never reaches the node any other way. Requests and
// responses are limited to MaxMessageSize (8 MiB) each way.
//
// # Authorization
//
// The server requires a client certificate that chains to the fleet CA
// (tls.RequireAndVerifyClientCert, as pki.ServerTLS configures). For every
// call, the verified certificate's host (pki.PeerHost) must equal the
// request's claimed sender: EvidenceRequest.Source, PrepareRequest.Source,
// FinishRequest.Source, StatusRequest.From, IdentityRequest.From,
// ActivateRequest.From, PullRequest.Dest. Otherwise the call fails with
// PermissionDenied (Unauthenticated when there is no verified
// certificate), the message names both hosts, and the node is not called.
// The client in turn checks that the server's verified certificate names
// the host it dialled, whatever the address or TLS server name.
//
// Interceptors added with WithUnaryInterceptor see each request after the
// strict decoder, as its *migrate.XRequest, and before authorization.
//
// # Errors
//
// A handler's error travels as a gRPC status whose message is the
// original error text and whose details hold a google.rpc.ErrorInfo
// (domain "vtpmm.migrate.v1") with the reason code of the first sentinel
// in the chain, and metadata "reasons" listing all of them. The client
// returns a *RemoteError that matches (errors.Is) every class named, and so
// its sentinel, and answers status.Code:
//
//	sentinel                   reason                 gRPC code
//	migrate.ErrReplay          ERR_REPLAY             AlreadyExists
//	migrate.ErrBusy            ERR_BUSY               Aborted
//	migrate.ErrUnknownTx       ERR_UNKNOWN_TX         NotFound
//	vtpm.ErrStaleGeneration    ERR_STALE_GENERATION   FailedPrecondition
//	vtpm.ErrWrongKey           ERR_WRONG_KEY          InvalidArgument
//	vtpm.ErrKeyExists          ERR_KEY_EXISTS         AlreadyExists
//	vtpm.ErrKeyNotFound        ERR_KEY_NOT_FOUND      NotFound
//	migrate.ErrNotOwner        ERR_NOT_OWNER          FailedPrecondition
//	migrate.ErrNotMigrating    ERR_NOT_MIGRATING      FailedPrecondition
//	migrate.ErrRefused         ERR_REFUSED            FailedPrecondition
//	migrate.ErrKeyProof        ERR_KEY_PROOF          FailedPrecondition
//	migrate.ErrHypervisor      ERR_HYPERVISOR         Internal
//	migrate.ErrUnresolved      ERR_UNRESOLVED         Aborted
//	migrate.ErrPeer            ERR_PEER               Unavailable
//	migrate.ErrCrash           ERR_CRASH              Internal
//	wire.ErrUnauthorized       ERR_UNAUTHORIZED       PermissionDenied / Unauthenticated
//	migrate.ErrBadMessage      ERR_BAD_MESSAGE        InvalidArgument
//	(none)                     -                      Unknown (or DeadlineExceeded, Canceled)
//
// The table is internal/errclass's, the one table of error classes (the
// admin API's codes and vtpmctl's exit codes come from it too); a sentinel
// matches by its class. The table is ordered: the first match picks the
// code. A failure that names no known reason — the transport (Unavailable: refused, reset,
// handshake failed; DeadlineExceeded; Canceled; ResourceExhausted for an
// oversized message) or a server error of no known class — matches
// migrate.ErrPeer, and also the context's error when the caller's context
// ended. The source therefore sees a network cut as ErrPeer before the
// hypervisor's migration and as ErrUnresolved after it (Finish), and
// Reconcile resolves it once the peer is reachable.
//
// A reason is the peer's word: an authenticated peer can lie about it as it
// could about any answer; the protocol's safety does not rest on it.
//
// # Connections
//
// Calls use the caller's deadline, or DefaultCallTimeout when the context
// has none. Calls fail fast while a peer is unreachable. A call that gets
// no answer from the peer's agent (Unavailable, DeadlineExceeded) evicts
// its connection, which is closed when its last call returns: the next
// call makes a fresh connection at once, rather than waiting out gRPC's
// reconnect backoff (200 ms to 5 s here) or riding a connection that
// silently stalled. Keepalive pings every 30 s while
// calls are in flight (10 s timeout) detect a silently dead peer; the
// server accepts pings no more often than every 20 s and closes
// connections idle for 15 minutes. Server.Serve stops gracefully when its
// context ends, and cuts the calls still running after the shutdown grace
// (DefaultShutdownGrace).
package wire
