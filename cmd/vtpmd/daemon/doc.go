// Package daemon is vtpmd's daemon: one host's running agent. It owns the
// daemon's configuration file (Config), its lifecycle (Start, Ready, Err,
// Close, in the way of etcd's embed), and the services it runs on top of a
// host.Host (the TPM-holding side, held as a field): the migration node
// (package migrate) with its ledger and audit log, the agent wire (gRPC
// over mTLS, migrate/wire), the admin API for vtpmctl (internal/adminapi)
// including libvirt's hook mode, Prometheus metrics, the recovery loop and
// the hypervisor's lifecycle events.
//
// Start opens every resource and binds every listener before it returns;
// a half-finished Start closes what it opened. The daemon then reconciles
// the transactions a crash left open and starts serving; Ready is closed
// when it serves. Err reports a service that failed. Close stops the
// services and closes the resources in the order its comment documents;
// it is idempotent.
//
// The daemon never names a hypervisor implementation: it opens the
// configured URI through the hypervisor.Registry it is given (cmd/vtpmd
// registers libvirt), so it builds without cgo.
package daemon
