package registry_test

import (
	"context"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
)

func TestSmoke(t *testing.T) {
	t0 := time.Now()
	c := registrytest.Start(t, registrytest.Options{})
	t.Logf("started in %v", time.Since(t0))
	ctx := context.Background()
	op := c.Open(t, "root")
	registrytest.Enroll(t, op, "host-a", "host-b")
	a := c.Open(t, "host-a")
	if _, err := a.CreateVM(ctx, "vm1", "host-a"); err != nil {
		t.Fatal(err)
	}
	b := registry.Batch{TxID: "tx1", From: "host-a", To: "host-b", VMs: []registry.VMGen{{ID: "vm1", Generation: 1}}}
	n0 := a.RoundTrips()
	if _, err := a.Begin(ctx, b); err != nil {
		t.Fatal(err)
	}
	vms, err := a.Commit(ctx, b)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v rtt %d", vms, a.RoundTrips()-n0)
}
