package registry

import (
	"context"
	"sync/atomic"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// CountingKV wraps an etcd KV and counts round trips: every Get, Put,
// Delete, Do, Compact and committed Txn is one. Tests and benchmarks assert
// and report round trips per batch with it (Client.RoundTrips).
type CountingKV struct {
	clientv3.KV
	n atomic.Int64
}

var _ clientv3.KV = (*CountingKV)(nil)

// NewCountingKV wraps kv.
func NewCountingKV(kv clientv3.KV) *CountingKV { return &CountingKV{KV: kv} }

// Count returns the round trips so far.
func (c *CountingKV) Count() int64 { return c.n.Load() }

// Get counts one round trip.
func (c *CountingKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	c.n.Add(1)
	return c.KV.Get(ctx, key, opts...)
}

// Put counts one round trip.
func (c *CountingKV) Put(ctx context.Context, key, val string, opts ...clientv3.OpOption) (*clientv3.PutResponse, error) {
	c.n.Add(1)
	return c.KV.Put(ctx, key, val, opts...)
}

// Delete counts one round trip.
func (c *CountingKV) Delete(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.DeleteResponse, error) {
	c.n.Add(1)
	return c.KV.Delete(ctx, key, opts...)
}

// Compact counts one round trip.
func (c *CountingKV) Compact(ctx context.Context, rev int64, opts ...clientv3.CompactOption) (*clientv3.CompactResponse, error) {
	c.n.Add(1)
	return c.KV.Compact(ctx, rev, opts...)
}

// Do counts one round trip.
func (c *CountingKV) Do(ctx context.Context, op clientv3.Op) (clientv3.OpResponse, error) {
	c.n.Add(1)
	return c.KV.Do(ctx, op)
}

// Txn returns a transaction whose Commit counts one round trip.
func (c *CountingKV) Txn(ctx context.Context) clientv3.Txn {
	return &countingTxn{Txn: c.KV.Txn(ctx), n: &c.n}
}

type countingTxn struct {
	clientv3.Txn
	n *atomic.Int64
}

func (t *countingTxn) If(cs ...clientv3.Cmp) clientv3.Txn {
	t.Txn = t.Txn.If(cs...)
	return t
}

func (t *countingTxn) Then(ops ...clientv3.Op) clientv3.Txn {
	t.Txn = t.Txn.Then(ops...)
	return t
}

func (t *countingTxn) Else(ops ...clientv3.Op) clientv3.Txn {
	t.Txn = t.Txn.Else(ops...)
	return t
}

func (t *countingTxn) Commit() (*clientv3.TxnResponse, error) {
	t.n.Add(1)
	return t.Txn.Commit()
}
