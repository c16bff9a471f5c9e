//go:build e2e

package e2e_test

import (
	"context"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/test/fleet/scenarios"
)

// TestScenarios runs the migration scenarios (test/fleet: cold, warm,
// refused, and vtpmd SIGKILLed on the source or the destination during
// prepare or during libvirt's migration) on three lab hosts with real
// libvirtd, QEMU and swtpm, each VM a Linux guest that seals a secret in
// its vTPM and unseals it every second on its console; the same scenarios
// run in process under plain go test (test/fleet/inproc).
func TestScenarios(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	img := guestImage(ctx, t)
	f := newVFleet(ctx, t, hostA(), hostB(), hostC())
	f.Start(ctx)
	scenarios.Run(t, f.Contract(img))
}
