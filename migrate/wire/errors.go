package wire

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/vtpm"
)

// ErrorDomain is the google.rpc.ErrorInfo domain of the wire's error
// reasons.
const ErrorDomain = "vtpmm.migrate.v1"

// ErrUnauthorized means the server refused a call: the client presented no
// verified certificate, or its certificate names another host than the
// request's claimed sender.
var ErrUnauthorized = errors.New("peer not authorized")

// Reason codes: stable, machine-readable names of the sentinel errors,
// sent as google.rpc.ErrorInfo.Reason in the status details.
const (
	ReasonBusy            = "ERR_BUSY"
	ReasonReplay          = "ERR_REPLAY"
	ReasonUnknownTx       = "ERR_UNKNOWN_TX"
	ReasonStaleGeneration = "ERR_STALE_GENERATION"
	ReasonWrongKey        = "ERR_WRONG_KEY"
	ReasonKeyExists       = "ERR_KEY_EXISTS"
	ReasonKeyNotFound     = "ERR_KEY_NOT_FOUND"
	ReasonNotOwner        = "ERR_NOT_OWNER"
	ReasonNotMigrating    = "ERR_NOT_MIGRATING"
	ReasonRefused         = "ERR_REFUSED"
	ReasonHypervisor      = "ERR_HYPERVISOR"
	ReasonUnresolved      = "ERR_UNRESOLVED"
	ReasonPeer            = "ERR_PEER"
	ReasonCrash           = "ERR_CRASH"
	ReasonUnauthorized    = "ERR_UNAUTHORIZED"
	ReasonBadMessage      = "ERR_BAD_MESSAGE"
)

// errorMapping is one row of the error table.
type errorMapping struct {
	err    error
	reason string
	code   codes.Code
}

// errorTable maps sentinels to reasons and status codes, most specific
// first: the first sentinel in an error's chain picks the status code;
// every sentinel in the chain is listed in the details. Read-only.
func errorTable() []errorMapping {
	return []errorMapping{
		{migrate.ErrReplay, ReasonReplay, codes.AlreadyExists},
		{migrate.ErrBusy, ReasonBusy, codes.Aborted},
		{migrate.ErrUnknownTx, ReasonUnknownTx, codes.NotFound},
		{vtpm.ErrStaleGeneration, ReasonStaleGeneration, codes.FailedPrecondition},
		{vtpm.ErrWrongKey, ReasonWrongKey, codes.InvalidArgument},
		{vtpm.ErrKeyExists, ReasonKeyExists, codes.AlreadyExists},
		{vtpm.ErrKeyNotFound, ReasonKeyNotFound, codes.NotFound},
		{migrate.ErrNotOwner, ReasonNotOwner, codes.FailedPrecondition},
		{migrate.ErrNotMigrating, ReasonNotMigrating, codes.FailedPrecondition},
		{migrate.ErrRefused, ReasonRefused, codes.FailedPrecondition},
		{migrate.ErrHypervisor, ReasonHypervisor, codes.Internal},
		{migrate.ErrUnresolved, ReasonUnresolved, codes.Aborted},
		{migrate.ErrPeer, ReasonPeer, codes.Unavailable},
		{migrate.ErrCrash, ReasonCrash, codes.Internal},
		{ErrUnauthorized, ReasonUnauthorized, codes.PermissionDenied},
		{migrate.ErrBadMessage, ReasonBadMessage, codes.InvalidArgument},
	}
}

// toStatus turns a handler's error into a gRPC status error carrying the
// original message and, in an ErrorInfo detail, the reason codes of every
// sentinel in its chain (metadata "reasons", comma-separated).
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := err.(interface{ GRPCStatus() *status.Status }); ok {
		return err // already a status (e.g. from an interceptor)
	}
	code := codes.Unknown
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	}
	var reasons []string
	for _, m := range errorTable() {
		if errors.Is(err, m.err) {
			if len(reasons) == 0 {
				code = m.code
			}
			reasons = append(reasons, m.reason)
		}
	}
	st := status.New(code, err.Error())
	if len(reasons) > 0 {
		if d, derr := st.WithDetails(&errdetails.ErrorInfo{
			Reason:   reasons[0],
			Domain:   ErrorDomain,
			Metadata: map[string]string{"reasons": strings.Join(reasons, ",")},
		}); derr == nil {
			st = d
		}
	}
	return st.Err()
}

// denied is the status for a failed authorization.
func denied(code codes.Code, msg string) error {
	st := status.New(code, fmt.Sprintf("%s: %s", ErrUnauthorized, msg))
	if d, err := st.WithDetails(&errdetails.ErrorInfo{Reason: ReasonUnauthorized, Domain: ErrorDomain}); err == nil {
		st = d
	}
	return st.Err()
}

// RemoteError is the error of a failed call to a peer agent, as the client
// sees it. errors.Is matches the sentinels the server named in its reasons
// (migrate.ErrBusy, vtpm.ErrStaleGeneration, ...); a failure without a
// known reason (connection refused or lost, deadline, a server error of no
// known class) matches migrate.ErrPeer, and the context's error too when
// the caller's context ended. status.Code(err) gives the gRPC code.
type RemoteError struct {
	Host    string     // the peer
	Method  string     // Evidence, Prepare, Finish or Status
	Code    codes.Code // the gRPC status code
	Reasons []string   // ERR_* reason codes sent by the server, if any
	Message string     // the server's (or the transport's) message

	st   *status.Status
	errs []error
}

func (e *RemoteError) Error() string {
	if len(e.Reasons) == 0 {
		return fmt.Sprintf("%s %s: %v: %s (%s)", e.Host, e.Method, migrate.ErrPeer, e.Message, e.Code)
	}
	return fmt.Sprintf("%s %s: %s", e.Host, e.Method, e.Message)
}

// Unwrap returns the sentinels the error matches.
func (e *RemoteError) Unwrap() []error { return e.errs }

// GRPCStatus returns the call's status (for status.Code and status.FromError).
func (e *RemoteError) GRPCStatus() *status.Status { return e.st }

// fromStatus maps a client-side call error back to sentinels.
func fromStatus(ctx context.Context, host, method string, err error) error {
	st := status.Convert(err)
	e := &RemoteError{Host: host, Method: method, Code: st.Code(), Message: st.Message(), st: st}
	table := errorTable()
	for _, d := range st.Details() {
		info, ok := d.(*errdetails.ErrorInfo)
		if !ok || info.GetDomain() != ErrorDomain {
			continue
		}
		names := []string{info.GetReason()}
		if all := info.GetMetadata()["reasons"]; all != "" {
			names = strings.Split(all, ",")
		}
		for _, name := range names {
			for _, m := range table {
				if m.reason == name {
					e.Reasons = append(e.Reasons, name)
					e.errs = append(e.errs, m.err)
				}
			}
		}
	}
	if len(e.errs) == 0 {
		e.errs = append(e.errs, migrate.ErrPeer)
	}
	if cerr := callerContextErr(ctx, st.Code()); cerr != nil {
		e.errs = append(e.errs, cerr)
	}
	return e
}

// callerContextErr is the caller's context error when the call ended with
// it. gRPC can report DeadlineExceeded (the server's copy of the deadline
// cancelled the stream) a moment before the caller's own context timer has
// fired, so a passed deadline counts even while ctx.Err() is still nil.
func callerContextErr(ctx context.Context, code codes.Code) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if dl, ok := ctx.Deadline(); ok && code == codes.DeadlineExceeded && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return nil
}
