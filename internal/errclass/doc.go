// Package errclass owns vtpmm's table of error classes, defined once in
// the way of containerd's errdefs: each Class has a stable wire reason
// (ERR_BUSY, ...) and gRPC status code, sent by the agent wire
// (migrate/wire), and an admin API Code (ok, refused, aborted, unresolved,
// busy, error), from which vtpmctl's exit code follows. Packages define
// their sentinel errors with New (one sentinel per class):
//
//	ErrBusy = errclass.New(errclass.Busy, "VM is already being migrated")
//
// errors.Is(err, errclass.Busy) matches such a sentinel anywhere in err's
// chain. An error decoded from another process (Decode, and the agent
// wire's RemoteError) carries the classes the sender named, and
// errors.Is matches it against the sentinels of those classes, so
// errors.Is(remote, migrate.ErrBusy) holds on the client as on the server.
//
// It imports nothing of vtpmm (the gRPC codes are their numbers).
package errclass
