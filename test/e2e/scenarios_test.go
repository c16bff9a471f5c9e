//go:build e2e

package e2e_test

import (
	"context"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/test/fleet/scenarios"
)

// TestScenarios runs the migration scenarios (test/fleet: cold, warm,
// refused, vtpmd SIGKILLed on the source or the destination during
// prepare or during libvirt's migration, and the registry's quorum: a
// migration with one etcd member down, one refused while the quorum is
// lost with the VM still running at its source) on three lab hosts with
// real libvirtd, QEMU and swtpm and the fleet registry embedded in their
// vtpmds (a three-member etcd cluster, one member in each host's
// namespaces), each VM a Linux guest that seals a secret in its vTPM and
// unseals it every second on its console; the same scenarios run in
// process under plain go test (test/fleet/inproc).
func TestScenarios(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	img := guestImage(ctx, t)
	f := newRegistryFleet(ctx, t, "embedded", hostA(), hostB(), hostC())
	f.Start(ctx)
	scenarios.Run(t, f.Contract(img))
}
