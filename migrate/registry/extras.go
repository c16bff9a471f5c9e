package registry

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// PutStandby implements Records: one round trip.
func (c *Client) PutStandby(ctx context.Context, s Standby) error {
	op := fmt.Sprintf("registry: put standby %s/%s", s.VM, s.Host)
	s.V = Version
	if s.Updated.IsZero() {
		s.Updated = c.cfg.Now().UTC()
	}
	val, err := encode(&s)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return c.do(ctx, op, func(ctx context.Context) error {
		_, err := c.kv.Put(ctx, c.k.standby(s.VM, s.Host), string(val))
		return err
	})
}

// DropStandby implements Records: one round trip.
func (c *Client) DropStandby(ctx context.Context, vmID, host string) error {
	op := fmt.Sprintf("registry: drop standby %s/%s", vmID, host)
	if err := validID("VM", vmID); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if err := validHost(host); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return c.do(ctx, op, func(ctx context.Context) error {
		_, err := c.kv.Delete(ctx, c.k.standby(vmID, host))
		return err
	})
}

// Standbys implements Records: one round trip.
func (c *Client) Standbys(ctx context.Context, vmID string) ([]Standby, error) {
	op := "registry: standbys of " + vmID
	if err := validID("VM", vmID); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	var resp *clientv3.GetResponse
	err := c.do(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Get(ctx, c.k.standbys(vmID), clientv3.WithPrefix())
		return err
	})
	if err != nil {
		return nil, err
	}
	out := make([]Standby, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		s, err := DecodeStandby(kv.Value)
		if err != nil {
			return nil, fmt.Errorf("%s: %s: %w", op, kv.Key, err)
		}
		if c.k.standby(s.VM, s.Host) != string(kv.Key) {
			return nil, fmt.Errorf("%s: %s: %w: record of %s/%s", op, kv.Key, ErrBadRecord, s.VM, s.Host)
		}
		out = append(out, s)
	}
	return out, nil
}

// Plan implements Records: one round trip.
func (c *Client) Plan(ctx context.Context, source string) (Plan, int64, error) {
	op := "registry: evacuation plan of " + source
	if err := validHost(source); err != nil {
		return Plan{}, 0, fmt.Errorf("%s: %w", op, err)
	}
	var resp *clientv3.GetResponse
	err := c.do(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Get(ctx, c.k.plan(source))
		return err
	})
	if err != nil {
		return Plan{}, 0, err
	}
	if len(resp.Kvs) == 0 {
		return Plan{}, 0, fmt.Errorf("%s: %w", op, ErrNotFound)
	}
	p, err := DecodePlan(resp.Kvs[0].Value)
	if err != nil {
		return Plan{}, 0, fmt.Errorf("%s: %w", op, err)
	}
	if p.Source != source {
		return Plan{}, 0, fmt.Errorf("%s: %w: plan of %s", op, ErrBadRecord, p.Source)
	}
	return p, resp.Kvs[0].ModRevision, nil
}

// PutPlan implements Records: one transaction comparing the revision.
func (c *Client) PutPlan(ctx context.Context, p Plan, rev int64) (int64, error) {
	op := "registry: put evacuation plan of " + p.Source
	p.V = Version
	now := c.cfg.Now().UTC()
	if p.Created.IsZero() {
		p.Created = now
	}
	p.Updated = now
	val, err := encode(&p)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", op, err)
	}
	if len(val) > MaxPlanBytes {
		return 0, fmt.Errorf("%s: %w: %d bytes, limit %d", op, ErrBatchTooLarge, len(val), MaxPlanBytes)
	}
	key := c.k.plan(p.Source)
	var resp *clientv3.TxnResponse
	err = c.do(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).Then(clientv3.OpPut(key, string(val))).Commit()
		return err
	})
	if err != nil {
		return 0, err
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("%s: %w: the plan is no longer at revision %d", op, ErrConflict, rev)
	}
	return resp.Header.Revision, nil
}

// DeletePlan implements Records: one transaction comparing the revision.
func (c *Client) DeletePlan(ctx context.Context, source string, rev int64) error {
	op := "registry: delete evacuation plan of " + source
	if err := validHost(source); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	key := c.k.plan(source)
	var resp *clientv3.TxnResponse
	err := c.do(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).Then(clientv3.OpDelete(key)).Commit()
		return err
	})
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		return fmt.Errorf("%s: %w: the plan is no longer at revision %d", op, ErrConflict, rev)
	}
	return nil
}
