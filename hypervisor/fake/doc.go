// Package fake is a working fake hypervisor that follows libvirt 9.0's rules
// for VMs with an encrypted emulator vTPM, without libvirt or QEMU. Every
// running VM's vTPM is a real swtpm process on real, encrypted state, and a
// migration moves that state's real (migration-key encrypted) blobs from
// the source swtpm to a fresh swtpm on the destination, exactly like QEMU's
// tpm-emulator backend does in the migration stream.
//
// The fake hosts of one test live in an injected *Network (there is no
// package state): AddHost creates a Host, which implements
// hypervisor.Hypervisor; Host.Target names it as a migration destination,
// and SetDown makes it unreachable.
//
// The rules it follows:
//
//   - vTPM secrets are ephemeral and private: kept in memory, never written
//     to disk, never readable back.
//   - The secret is read only when swtpm starts: at StartDomain (cold start)
//     and on an incoming migration. The source needs no secret to migrate
//     out.
//   - A destination without the secret refuses at once
//     (hypervisor.ErrSecretMissing, "Secret not found: no secret with
//     matching uuid ..."). A destination whose secret has another value
//     fails late, after the state was copied (hypervisor.ErrSecretMismatch,
//     "operation failed: job 'migration out' unexpectedly failed"). Either
//     way the VM keeps running on the source with its vTPM state intact,
//     including the volatile state (PCRs) that PCR-bound seals depend on.
//   - After a successful migration the VM runs only on the destination
//     (persistent there, on state under the destination's Dir); the source
//     domain is undefined and its state removed. The source's secret is
//     left alone.
//   - A second migration of a VM that is already migrating fails with
//     "domain is already being migrated".
//
// Test hooks are exported fields on Host (FailNextMigrate, FailDefineSecret,
// BeforeMigrateCommit); set them while the host is idle.
package fake
