// Package migrate owns the move of vTPM keys between hosts: the messages
// two agents exchange, the transfer envelope (one transfer key per batch,
// wrapped for the destination's TPM-resident migration key), the two-phase
// transfer with named crash points, the ownership ledger (bbolt), and the
// recovery that reconciles both hosts after a crash.
//
// A Node is one host's side. As a source it drives Migrate; as a
// destination it serves the Peer methods (Evidence, Prepare, Finish,
// Status). Every step is persisted in the ledger before it acts, so a crash
// at any CrashPoint leaves enough to decide, with the peer's and the
// hypervisor's view, where the VM runs; Reconcile then finishes or undoes
// the transaction. See docs/protocol.md.
package migrate
