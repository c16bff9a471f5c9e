package errclass

import (
	"errors"
	"slices"
)

// Class is one class of error. It is itself an error, so that
// errors.Is(err, Busy) works; its message is its name.
type Class string

// The classes, in the agent wire's order: the first class an error matches
// picks its gRPC status code.
const (
	Replay          Class = "replay"
	Busy            Class = "busy"
	UnknownTx       Class = "unknown-tx"
	StaleGeneration Class = "stale-generation"
	WrongKey        Class = "wrong-key"
	KeyExists       Class = "key-exists"
	KeyNotFound     Class = "key-not-found"
	NotOwner        Class = "not-owner"
	NotMigrating    Class = "not-migrating"
	Refused         Class = "refused"
	KeyProof        Class = "key-proof"
	Hypervisor      Class = "hypervisor"
	Unresolved      Class = "unresolved"
	Peer            Class = "peer"
	Crash           Class = "crash"
	Unauthorized    Class = "unauthorized"
	BadMessage      Class = "bad-message"
)

// Code is the admin API's classification of how an operation ended
// (migrations, enrolments, hook calls). vtpmctl's exit code follows from it.
type Code string

// Codes, from the most to the least specific: an error that matches
// classes of several codes gets the first of them.
const (
	CodeOK         Code = "ok"
	CodeRefused    Code = "refused"    // refused by attestation; nothing left this host
	CodeUnresolved Code = "unresolved" // left open by a crash or a cut; recovery finishes it
	CodeBusy       Code = "busy"       // another migration holds the VM
	CodeAborted    Code = "aborted"    // failed and rolled back; the VM runs on the source
	CodeError      Code = "error"      // anything else
)

// gRPC status codes (google.golang.org/grpc/codes), by number, so that
// this package does not link gRPC into the CLI.
const (
	grpcInvalidArgument    = 3
	grpcNotFound           = 5
	grpcAlreadyExists      = 6
	grpcPermissionDenied   = 7
	grpcFailedPrecondition = 9
	grpcAborted            = 10
	grpcInternal           = 13
	grpcUnavailable        = 14
)

// row is one line of the table.
type row struct {
	class  Class
	reason string // google.rpc.ErrorInfo reason on the agent wire
	grpc   uint32 // gRPC status code
	code   Code   // admin API code
}

// table is the one table of error classes, in the agent wire's order.
func table() []row {
	return []row{
		{Replay, "ERR_REPLAY", grpcAlreadyExists, CodeError},
		{Busy, "ERR_BUSY", grpcAborted, CodeBusy},
		{UnknownTx, "ERR_UNKNOWN_TX", grpcNotFound, CodeError},
		{StaleGeneration, "ERR_STALE_GENERATION", grpcFailedPrecondition, CodeAborted},
		{WrongKey, "ERR_WRONG_KEY", grpcInvalidArgument, CodeError},
		{KeyExists, "ERR_KEY_EXISTS", grpcAlreadyExists, CodeError},
		{KeyNotFound, "ERR_KEY_NOT_FOUND", grpcNotFound, CodeError},
		{NotOwner, "ERR_NOT_OWNER", grpcFailedPrecondition, CodeError},
		{NotMigrating, "ERR_NOT_MIGRATING", grpcFailedPrecondition, CodeError},
		{Refused, "ERR_REFUSED", grpcFailedPrecondition, CodeRefused},
		{KeyProof, "ERR_KEY_PROOF", grpcFailedPrecondition, CodeAborted},
		{Hypervisor, "ERR_HYPERVISOR", grpcInternal, CodeAborted},
		{Unresolved, "ERR_UNRESOLVED", grpcAborted, CodeUnresolved},
		{Peer, "ERR_PEER", grpcUnavailable, CodeAborted},
		{Crash, "ERR_CRASH", grpcInternal, CodeError},
		{Unauthorized, "ERR_UNAUTHORIZED", grpcPermissionDenied, CodeError},
		{BadMessage, "ERR_BAD_MESSAGE", grpcInvalidArgument, CodeError},
	}
}

// codeOrder is the precedence of codes (CodeOf).
func codeOrder() []Code { return []Code{CodeRefused, CodeUnresolved, CodeBusy, CodeAborted, CodeError} }

func (c Class) row() (row, bool) {
	for _, r := range table() {
		if r.class == c {
			return r, true
		}
	}
	return row{}, false
}

// Error returns the class's name.
func (c Class) Error() string { return string(c) }

// Is reports whether target is a sentinel of this class (New).
func (c Class) Is(target error) bool {
	s, ok := target.(*sentinel)
	return ok && s.class == c
}

// Reason is the class's reason code on the agent wire ("ERR_BUSY").
func (c Class) Reason() string { r, _ := c.row(); return r.reason }

// GRPCCode is the gRPC status code of an error whose first class is c.
func (c Class) GRPCCode() uint32 { r, _ := c.row(); return r.grpc }

// Code is the admin API code of the class.
func (c Class) Code() Code {
	if r, ok := c.row(); ok {
		return r.code
	}
	return CodeError
}

// All lists every class in table order.
func All() []Class {
	t := table()
	out := make([]Class, len(t))
	for i, r := range t {
		out[i] = r.class
	}
	return out
}

// ByReason returns the class of a wire reason code.
func ByReason(reason string) (Class, bool) {
	for _, r := range table() {
		if r.reason == reason {
			return r.class, true
		}
	}
	return "", false
}

// sentinel is a package's sentinel error of one class.
type sentinel struct {
	class Class
	msg   string
}

// New returns a sentinel error of class c with message msg. Define one
// sentinel per class, in the package's errors.go.
func New(c Class, msg string) error { return &sentinel{class: c, msg: msg} }

func (s *sentinel) Error() string { return s.msg }

// Is matches the sentinel's class, and any sentinel of the same class (so
// that errors decoded from another process match the local sentinel).
func (s *sentinel) Is(target error) bool {
	switch t := target.(type) {
	case Class:
		return t == s.class
	case *sentinel:
		return t.class == s.class
	}
	return false
}

// Classes lists, in table order, the classes err matches.
func Classes(err error) []Class {
	if err == nil {
		return nil
	}
	var out []Class
	for _, r := range table() {
		if errors.Is(err, r.class) {
			out = append(out, r.class)
		}
	}
	return out
}

// Reasons lists the wire reasons of the classes err matches, in table order.
func Reasons(err error) []string {
	var out []string
	for _, c := range Classes(err) {
		out = append(out, c.Reason())
	}
	return out
}

// CodeOf is the admin API code of err: CodeOK for nil, otherwise the most
// specific code among its classes (refused, unresolved, busy, aborted),
// else CodeError.
func CodeOf(err error) Code {
	if err == nil {
		return CodeOK
	}
	cs := Classes(err)
	for _, code := range codeOrder() {
		for _, c := range cs {
			if c.Code() == code {
				return code
			}
		}
	}
	return CodeError
}

// ExitCode is vtpmctl's exit code for an operation that ended with code:
// 0 ok, 2 refused, 3 aborted, 4 unresolved, 5 busy, 1 anything else.
func (c Code) ExitCode() int {
	switch c {
	case CodeOK:
		return 0
	case CodeRefused:
		return 2
	case CodeAborted:
		return 3
	case CodeUnresolved:
		return 4
	case CodeBusy:
		return 5
	}
	return 1
}

// Remote is an error decoded from another process (the admin API): the
// sender's message, its code and the classes it named. errors.Is matches
// each class, and every sentinel of those classes.
type Remote struct {
	Message string
	Code    Code
	Classes []Class
}

// Decode rebuilds an error from its message, code and wire reasons;
// unknown reasons are ignored.
func Decode(message string, code Code, reasons []string) *Remote {
	e := &Remote{Message: message, Code: code}
	for _, r := range reasons {
		if c, ok := ByReason(r); ok && !slices.Contains(e.Classes, c) {
			e.Classes = append(e.Classes, c)
		}
	}
	if e.Code == "" {
		e.Code = CodeError
	}
	return e
}

func (e *Remote) Error() string { return e.Message }

// Unwrap returns the classes, for errors.Is.
func (e *Remote) Unwrap() []error {
	out := make([]error, len(e.Classes))
	for i, c := range e.Classes {
		out[i] = c
	}
	return out
}

// ExitCode is vtpmctl's exit code for err: 0 for nil; an error decoded
// from vtpmd by its code; any other error by CodeOf.
func ExitCode(err error) int {
	var r *Remote
	if errors.As(err, &r) {
		return r.Code.ExitCode()
	}
	return CodeOf(err).ExitCode()
}
