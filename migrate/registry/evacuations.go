package registry

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// MaxEvacuationBytes bounds an evacuation record (package
// migrate/evacuate's Record: about 5000 VMs).
const MaxEvacuationBytes = MaxPlanBytes

// The evacuation record of a source host lives under evac/HOST, the key a
// host's own role may write (Bootstrap): package migrate/evacuate owns its
// format (a versioned JSON Record, decoded strictly there), the registry
// only stores it with compare-and-swap on its revision. It replaces the
// earlier Plan format under the same key; Plan refuses a Record.

// LoadEvacuation reads the evacuation record of source and its revision
// (ErrNotFound when there is none): one round trip.
func (c *Client) LoadEvacuation(ctx context.Context, source string) ([]byte, int64, error) {
	op := "registry: evacuation record of " + source
	if err := validHost(source); err != nil {
		return nil, 0, fmt.Errorf("%s: %w", op, err)
	}
	var resp *clientv3.GetResponse
	err := c.read(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Get(ctx, c.k.plan(source))
		return err
	})
	if err != nil {
		return nil, 0, err
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, fmt.Errorf("%s: %w", op, ErrNotFound)
	}
	return resp.Kvs[0].Value, resp.Kvs[0].ModRevision, nil
}

// SaveEvacuation writes source's evacuation record if its revision is
// still rev (0: only if there is none) and returns the new revision;
// ErrConflict otherwise. One round trip.
func (c *Client) SaveEvacuation(ctx context.Context, source string, data []byte, rev int64) (int64, error) {
	op := "registry: save evacuation record of " + source
	if err := validHost(source); err != nil {
		return 0, fmt.Errorf("%s: %w", op, err)
	}
	if len(data) > MaxEvacuationBytes {
		return 0, fmt.Errorf("%s: %w: %d bytes, limit %d", op, ErrBatchTooLarge, len(data), MaxEvacuationBytes)
	}
	key := c.k.plan(source)
	var resp *clientv3.TxnResponse
	err := c.do(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).Then(clientv3.OpPut(key, string(data))).Commit()
		return err
	})
	if err != nil {
		return 0, err
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("%s: %w: the record is no longer at revision %d", op, ErrConflict, rev)
	}
	return resp.Header.Revision, nil
}

// Session names this client's registry session: its liveness lease, in
// hex ("" before Register). A process that crashes loses it within the
// lease's TTL; Close revokes it at once.
func (c *Client) Session() string {
	c.liveMu.Lock()
	defer c.liveMu.Unlock()
	if c.lease == 0 {
		return ""
	}
	return strconv.FormatInt(int64(c.lease), 16)
}

// SessionAlive reports whether the session (a lease, as Session names it)
// is still alive: one round trip (LeaseTimeToLive).
func (c *Client) SessionAlive(ctx context.Context, session string) (bool, error) {
	op := "registry: session " + session
	id, err := strconv.ParseInt(session, 16, 64)
	if err != nil || id <= 0 {
		return false, fmt.Errorf("%s: %w: not a lease", op, ErrBadRecord)
	}
	var ttl int64
	err = c.read(ctx, op, func(ctx context.Context) error {
		resp, err := c.cli.TimeToLive(ctx, clientv3.LeaseID(id))
		if errors.Is(rpctypes.Error(err), rpctypes.ErrLeaseNotFound) {
			ttl = -1 // expired or revoked
			return nil
		}
		if err == nil {
			ttl = resp.TTL
		}
		return err
	})
	if err != nil {
		return false, err
	}
	// etcd answers -1 for a lease that expired or was revoked, and the
	// whole seconds left (0 in its last second) for a live one.
	return ttl >= 0, nil
}
