package migrate

import (
	"context"

	"github.com/vtpmm/vtpmm/migrate/registry"
)

// Registry is the fleet registry as the migration engine uses it: who owns
// each VM at which generation, and every change of it as one
// compare-and-swap (package migrate/registry implements it on etcd; its
// registrytest.Fake follows the same rules). A nil Registry is registry
// mode none: ownership is decided by this host's ledger, key store and TPM
// anchor, and peers come from the static configuration.
//
// The contract between the source and the destination when a Registry is
// set (docs/protocol.md):
//   - the source opens the batch (Begin: each VM {From, g, tx:{id, To}})
//     before it dials the destination, and commits it (Commit: {To, g+1})
//     after the hypervisor moved the VM and before Finish;
//   - the destination accepts a Prepare for a VM only if the registry shows
//     the VM owned by the sender at exactly the generation below the one
//     offered, with this transaction open to this host (Cached first, one
//     VMs read when the cache has not seen the Begin yet);
//   - recovery reads the registry once per transaction to decide.
type Registry interface {
	VMs(ctx context.Context, ids ...string) (registry.View, error)
	Cached(ids ...string) registry.View
	Begin(ctx context.Context, b registry.Batch) ([]registry.VM, error)
	Commit(ctx context.Context, b registry.Batch) ([]registry.VM, error)
	Abort(ctx context.Context, b registry.Batch) ([]registry.VM, error)
	Bump(ctx context.Context, b registry.Bump) (registry.VM, error)
}

var _ Registry = (registry.Ownership)(nil)
