package migrate

import "fmt"

// CrashPoint names a step of the transfer. A test may make a node "die"
// there through Config.Crash; production code never sets the hook.
type CrashPoint string

// Crash points, in protocol order. Source points start with "src/",
// destination points with "dst/".
const (
	SrcAfterBegin      CrashPoint = "src/after-begin"      // ledger: begun; nothing sent
	SrcAfterRegBegin   CrashPoint = "src/after-reg-begin"  // registry: transaction open; nothing sent
	SrcAfterAttest     CrashPoint = "src/after-attest"     // destination verified; nothing sent
	SrcAfterPrepare    CrashPoint = "src/after-prepare"    // destination holds PENDING keys; not yet persisted here
	SrcAfterPrepared   CrashPoint = "src/after-prepared"   // ledger: prepared; hypervisor not yet asked
	SrcAfterHypervisor CrashPoint = "src/after-hypervisor" // VM runs on the destination; not yet persisted here
	SrcAfterMigrated   CrashPoint = "src/after-migrated"   // ledger: migrated; commit not yet sent
	SrcAfterRegCommit  CrashPoint = "src/after-reg-commit" // registry: destination owns; Finish not yet sent
	SrcAfterFinish     CrashPoint = "src/after-finish"     // destination committed; source key not yet shredded

	DstAfterLedger  CrashPoint = "dst/after-ledger"  // ledger: pending; no key stored
	DstAfterKeys    CrashPoint = "dst/after-keys"    // PENDING keys stored; secrets not defined
	DstAfterSecrets CrashPoint = "dst/after-secrets" // secrets defined; not acknowledged
	DstAfterCommit  CrashPoint = "dst/after-commit"  // keys promoted; ledger not final
)

// FailoverAfterTakeOver is a failover's crash point (failover.go): the
// registry shows the promoting standby the owner; its key is still
// PENDING. Not in CrashPoints (no migration reaches it).
const FailoverAfterTakeOver CrashPoint = "failover/after-takeover"

// CrashPoints lists every crash point, for tests that visit them all.
var CrashPoints = []CrashPoint{
	SrcAfterBegin, SrcAfterRegBegin, SrcAfterAttest, SrcAfterPrepare, SrcAfterPrepared, SrcAfterHypervisor,
	SrcAfterMigrated, SrcAfterRegCommit, SrcAfterFinish, DstAfterLedger, DstAfterKeys, DstAfterSecrets, DstAfterCommit,
}

// RegistryOnly reports whether p is a step of the fleet registry, reached
// only when Config.Registry is set.
func (p CrashPoint) RegistryOnly() bool { return p == SrcAfterRegBegin || p == SrcAfterRegCommit }

// CrashHook is called at every crash point; a non-nil error stops the node there.
type CrashHook func(CrashPoint) error

// CrashAt returns a hook that crashes once, at p.
func CrashAt(p CrashPoint) CrashHook {
	fired := false
	return func(at CrashPoint) error {
		if at == p && !fired {
			fired = true
			return fmt.Errorf("%w at %s", ErrCrash, p)
		}
		return nil
	}
}

func (n *Node) crash(p CrashPoint) error {
	if n.cfg.Crash == nil {
		return nil
	}
	return n.cfg.Crash(p)
}
