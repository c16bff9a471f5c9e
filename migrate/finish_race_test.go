package migrate_test

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/vtpmm/vtpmm/migrate"
)

// TestConcurrentFinish: the source's Finish and the destination's own
// recovery (a lifecycle event, the loop) may finish one transaction at the
// same moment. Each must succeed with the same outcome; on the lab the
// second failed the source's Finish ("unsettled anchor change") while the
// first committed.
func TestConcurrentFinish(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	vm := a.createVM("vm1")
	a.migrateCrashing(ctx, vm, "host-b", migrate.SrcAfterMigrated)
	tx, ok := b.node.Incoming(vm)
	if !ok {
		t.Fatal("host-b holds no PENDING key after the hypervisor's migration")
	}
	const n = 4
	var wg sync.WaitGroup
	errs := make([]error, n)
	resps := make([]*migrate.FinishResponse, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resps[i], errs[i] = b.node.Finish(ctx, &migrate.FinishRequest{Version: migrate.ProtocolVersion, TxID: tx.ID, Source: "host-a", Commit: []string{vm}})
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("finish %d of %d at once: %v", i+1, n, errs[i])
		}
		if resps[i].State != migrate.DstCommitted || len(resps[i].Committed) != 1 {
			t.Fatalf("finish %d: %+v", i+1, resps[i])
		}
	}
	a.restart()
	if err := errors.Join(a.node.Reconcile(ctx), b.node.Reconcile(ctx)); err != nil {
		t.Fatal(err)
	}
	f.checkSingleOwner(vm, "host-b")
	b.checkAnchor()
}
