// Package migrate will own the agent wire protocol, the two-phase transfer
// with named crash points, the ownership ledger, evacuation, backup and
// standby replicas (issue #4). Nothing here yet.
package migrate
