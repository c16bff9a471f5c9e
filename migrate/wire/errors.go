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

	"github.com/vtpmm/vtpmm/internal/errclass"
	"github.com/vtpmm/vtpmm/migrate"
)

// ErrorDomain is the google.rpc.ErrorInfo domain of the wire's error
// reasons.
const ErrorDomain = "vtpmm.migrate.v1"

// ErrUnauthorized means the server refused a call: the client presented no
// verified certificate, or its certificate names another host than the
// request's claimed sender.
var ErrUnauthorized = errclass.New(errclass.Unauthorized, "peer not authorized")

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
	classes := errclass.Classes(err)
	reasons := make([]string, 0, len(classes))
	for i, c := range classes {
		if i == 0 {
			code = codes.Code(c.GRPCCode())
		}
		reasons = append(reasons, c.Reason())
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
	if d, err := st.WithDetails(&errdetails.ErrorInfo{Reason: errclass.Unauthorized.Reason(), Domain: ErrorDomain}); err == nil {
		st = d
	}
	return st.Err()
}

// RemoteError is the error of a failed call to a peer agent, as the client
// sees it. errors.Is matches the classes the server named in its reasons
// (internal/errclass), and so their sentinels (migrate.ErrBusy,
// vtpm.ErrStaleGeneration, ...); a failure without a
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

// Unwrap returns the classes the error matches (and the context's error).
func (e *RemoteError) Unwrap() []error { return e.errs }

// GRPCStatus returns the call's status (for status.Code and status.FromError).
func (e *RemoteError) GRPCStatus() *status.Status { return e.st }

// fromStatus maps a client-side call error back to sentinels.
func fromStatus(ctx context.Context, host, method string, err error) error {
	st := status.Convert(err)
	e := &RemoteError{Host: host, Method: method, Code: st.Code(), Message: st.Message(), st: st}
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
			if c, ok := errclass.ByReason(name); ok {
				e.Reasons = append(e.Reasons, name)
				e.errs = append(e.errs, c)
			}
		}
	}
	if len(e.errs) == 0 {
		e.errs = append(e.errs, errclass.Peer)
	}
	if cerr := callerContextErr(ctx, st.Code()); cerr != nil {
		e.errs = append(e.errs, cerr)
	} else if dl, ok := ctx.Deadline(); ok && st.Code() == codes.DeadlineExceeded && !time.Now().Before(dl) {
		// gRPC's deadline timer can fire before the context's own: the
		// caller's deadline passed all the same.
		e.errs = append(e.errs, context.DeadlineExceeded)
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
