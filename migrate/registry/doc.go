// Package registry owns the fleet registry: the one truth, kept in etcd,
// about which host owns each vTPM at which generation, which hosts exist
// (wire address, TPM identity, state active|draining|fenced), which hosts
// are live (an etcd lease each host keeps alive) and which hosts the
// operator enrolled. Later features keep their small records here too: a
// VM's standby replicas and a source host's evacuation plan.
//
// Ownership changes are compare-and-swap: Begin, Commit and Abort of a
// migration batch are one etcd transaction each, comparing every VM's exact
// record (owner, generation, open transaction); the generation is the
// fencing token. Bump gives a VM a generation above every one seen
// (restore, failover promotion). A batch read of many VMs is one round trip.
//
// Three modes (Config.Mode): ModeNone gives a nil Registry (callers keep
// the peer-to-peer behaviour); ModeEmbedded runs an etcd member inside the
// process (go.etcd.io/etcd/server/v3/embed) and talks to it; ModeEtcd talks
// to an external cluster. Both real modes use mutual TLS with the fleet PKI,
// and etcd's RBAC (Bootstrap) confines a host to vtpmm's prefix.
//
// Without quorum every change fails closed with ErrNoQuorum within
// Config.OpTimeout, and Cached returns the last view this host saw. See
// docs/registry.md for the key layout, the CAS rules and their costs.
package registry
