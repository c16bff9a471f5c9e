// Package adminapi owns vtpmd's local admin API, in the way of Vault's
// api/ package: the request and response types, the paths, the encoding
// of errors, and a Client over the unix socket. vtpmctl, the daemon and the
// tests use it; it never imports the daemon, and it links neither cgo nor
// gRPC, so vtpmctl builds with CGO_ENABLED=0.
//
// The API is JSON over HTTP on a unix socket that only root can open
// (mode 0600). Migrations stream their progress as JSON lines (one
// MigrateEvent per phase, then one with Done set). An error answers with
// an ErrorResponse whose code and reasons come from internal/errclass; the
// Client decodes it into an error that errors.Is matches against the
// sentinels of its classes (migrate.ErrRefused, ...).
package adminapi
