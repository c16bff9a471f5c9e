package registry

import (
	"context"
	"errors"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Failover records (issue 15, docs/failover.md). They live below the
// standby/ prefix, which every host's etcd user may write (Bootstrap), so
// no new grant is needed:
//
//	standby/VM/HOST        Standby   HOST is a standby of VM; Generation 0: assigned, no replica yet
//	standby/.fence/HOST    Fence     HOST was fenced (a fence agent ran, or the operator confirmed)
//
// A VM ID never starts with '.', so ".fence" is never a VM's directory.
//
// Fencing is per record (model finding F11): a host is fenced for a VM
// record when its fence record was written after the record's last change
// (fence ModRevision > the VM record's ModRevision). A promotion raises the
// record, so the fence no longer applies to the new owner's record; an
// owner whose fencer never promoted takes its VM back with a Bump, which
// ends the fence for that record and makes the fencer's CAS fail.

// Fence is a host's fence record (key standby/.fence/HOST).
type Fence struct {
	V    int       `json:"v"`
	Host string    `json:"host"`
	By   string    `json:"by"` // the host that ran the fence agent, or the operator
	At   time.Time `json:"at"`
}

func (f *Fence) validate() error {
	if err := checkVersion(f.V); err != nil {
		return err
	}
	if err := validHost(f.Host); err != nil {
		return err
	}
	return validHost(f.By)
}

// DecodeFence decodes a fence record strictly.
func DecodeFence(b []byte) (Fence, error) {
	var f Fence
	err := decodeStrict(b, MaxRecordBytes, &f)
	return f, err
}

func (k keys) fence(h string) string { return k.prefix + "standby/.fence/" + h }

// AssignStandby records host as a standby of vm with no replica yet
// (Generation 0), unless it already has a record: one transaction.
func (c *Client) AssignStandby(ctx context.Context, vmID, host string) error {
	op := fmt.Sprintf("registry: assign standby %s/%s", vmID, host)
	if err := validID("VM", vmID); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	s := Standby{V: Version, VM: vmID, Host: host, Updated: c.cfg.Now().UTC()}
	if err := validHost(host); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	val, err := encodeStandby(s)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	key := c.k.standby(vmID, host)
	return c.do(ctx, op, func(ctx context.Context) error {
		_, err := c.kv.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, val)).Commit()
		return err
	})
}

// RefreshStandby records the standby's replica at s.Generation, only while
// the host is still assigned (its record exists): a standby the operator
// removed (DropStandby) is never re-created by a late refresh
// (ErrNotFound). One transaction.
func (c *Client) RefreshStandby(ctx context.Context, s Standby) error {
	op := fmt.Sprintf("registry: refresh standby %s/%s", s.VM, s.Host)
	s.V = Version
	if s.Updated.IsZero() {
		s.Updated = c.cfg.Now().UTC()
	}
	val, err := encodeStandby(s)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	key := c.k.standby(s.VM, s.Host)
	var resp *clientv3.TxnResponse
	err = c.do(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), ">", 0)).
			Then(clientv3.OpPut(key, val)).Commit()
		return err
	})
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		return fmt.Errorf("%s: %w: the host is not assigned as a standby of the VM (rule standby-assigned)", op, ErrNotFound)
	}
	return nil
}

// encodeStandby validates a standby record, generation 0 (assigned, no
// replica) included.
func encodeStandby(s Standby) (string, error) {
	s.V = Version
	b, err := encode(&s)
	return string(b), err
}

// PutFence records that host was fenced by by (a fence agent's exit 0, or
// the operator's confirmation) and returns the record's revision.
func (c *Client) PutFence(ctx context.Context, host, by string) (int64, error) {
	op := fmt.Sprintf("registry: fence %s", host)
	f := Fence{V: Version, Host: host, By: by, At: c.cfg.Now().UTC()}
	val, err := encode(&f)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", op, err)
	}
	var resp *clientv3.PutResponse
	err = c.do(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Put(ctx, c.k.fence(host), string(val))
		return err
	})
	if err != nil {
		return 0, err
	}
	return resp.Header.Revision, nil
}

// FenceOf reads host's fence record and its revision (0 and no error when
// the host was never fenced).
func (c *Client) FenceOf(ctx context.Context, host string) (Fence, int64, error) {
	op := "registry: fence record of " + host
	if err := validHost(host); err != nil {
		return Fence{}, 0, fmt.Errorf("%s: %w", op, err)
	}
	var resp *clientv3.GetResponse
	err := c.read(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Get(ctx, c.k.fence(host))
		return err
	})
	if err != nil || len(resp.Kvs) == 0 {
		return Fence{}, 0, err
	}
	f, err := DecodeFence(resp.Kvs[0].Value)
	if err != nil {
		return Fence{}, 0, fmt.Errorf("%s: %w", op, err)
	}
	return f, resp.Kvs[0].ModRevision, nil
}

// VMRev reads one VM record with its ModRevision (the revision of its
// last change), which a fenced takeover (TakeOver) compares.
func (c *Client) VMRev(ctx context.Context, vmID string) (VM, int64, error) {
	op := "registry: read VM " + vmID
	if err := validID("VM", vmID); err != nil {
		return VM{}, 0, fmt.Errorf("%s: %w", op, err)
	}
	var resp *clientv3.GetResponse
	err := c.read(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Get(ctx, c.k.vm(vmID))
		return err
	})
	if err != nil {
		return VM{}, 0, err
	}
	if len(resp.Kvs) == 0 {
		return VM{}, 0, fmt.Errorf("%s: %w", op, ErrNotFound)
	}
	vm, err := c.decodeVMKV(resp.Kvs[0])
	if err != nil {
		return VM{}, 0, fmt.Errorf("%s: %w", op, err)
	}
	return vm, resp.Kvs[0].ModRevision, nil
}

// TakeOver is a failover's compare-and-swap (issue 15): one transaction
// that gives the VM to Owner at Generation if the record is still exactly
// Expect at revision ExpectRev, and every host in Fenced (the old owner,
// and an open migration's destination: model finding F7) has a fence
// record written after that revision (F10: a fenced owner counts as gone,
// even if it is live again; F11: fencing is per record). Owner must be
// enrolled and not in state fenced. Of standbys racing, exactly one wins;
// the others get ErrConflict, ErrWrongOwner or ErrStaleGeneration.
type TakeOver struct {
	VM         string
	Expect     VM
	ExpectRev  int64
	Owner      string
	Generation uint64
	Fenced     []string
}

// ErrNotFenced means a takeover's fence rule failed: a host it must fence
// has no fence record newer than the VM record.
var ErrNotFenced = errors.New("host not fenced for the VM's record")

// TakeOver runs the failover CAS (see TakeOver).
func (c *Client) TakeOver(ctx context.Context, t TakeOver) (VM, error) {
	op := "registry: take over " + t.VM
	if err := validID("VM", t.VM); err != nil {
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	if err := validGeneration(t.Generation); err != nil {
		return VM{}, fmt.Errorf("%s: %w (rule generation-bounds)", op, err)
	}
	if t.Expect.ID != t.VM || t.ExpectRev <= 0 || t.Generation <= t.Expect.Generation || len(t.Fenced) == 0 {
		return VM{}, fmt.Errorf("%s: %w: expected record, its revision, a raised generation and the fenced hosts are required", op, ErrBadRecord)
	}
	exp, err := vmValue(t.Expect)
	if err != nil {
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	next := VM{V: Version, ID: t.VM, Owner: t.Owner, Generation: t.Generation}
	val, err := vmValue(next)
	if err != nil {
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	key := c.k.vm(t.VM)
	cmps := []clientv3.Cmp{
		clientv3.Compare(clientv3.Value(key), "=", exp),
		clientv3.Compare(clientv3.ModRevision(key), "=", t.ExpectRev),
		clientv3.Compare(clientv3.Value(c.k.state(t.Owner)), "=", stateValue(StateActive)), // neither fenced nor draining
		clientv3.Compare(clientv3.CreateRevision(c.k.enrol(t.Owner)), ">", 0),
	}
	for _, h := range t.Fenced {
		if err := validHost(h); err != nil {
			return VM{}, fmt.Errorf("%s: %w", op, err)
		}
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(c.k.fence(h)), ">", t.ExpectRev))
	}
	elses := []clientv3.Op{clientv3.OpGet(key)}
	for _, h := range t.Fenced {
		elses = append(elses, clientv3.OpGet(c.k.fence(h)))
	}
	resp, err := c.putVMIf(ctx, op, key, val, next, cmps, elses)
	if err != nil {
		return VM{}, err
	}
	if resp.Succeeded {
		return next, nil
	}
	var errs []error
	kvs := resp.Responses[0].GetResponseRange().Kvs
	switch {
	case len(kvs) == 0:
		errs = append(errs, fmt.Errorf("%w (rule vm-present)", ErrNotFound))
	case kvs[0].ModRevision != t.ExpectRev:
		cur, derr := c.decodeVMKV(kvs[0])
		if derr == nil {
			c.cache.put(resp.Header.Revision, []VM{cur}, nil, false)
		}
		switch {
		case derr != nil:
			errs = append(errs, derr)
		case cur.Owner != t.Expect.Owner:
			errs = append(errs, fmt.Errorf("%w: owner is %s at generation %d, not %s (rule owner)", ErrWrongOwner, cur.Owner, cur.Generation, t.Expect.Owner))
		case cur.Generation != t.Expect.Generation:
			errs = append(errs, fmt.Errorf("%w: generation is %d, not %d (rule generation)", ErrStaleGeneration, cur.Generation, t.Expect.Generation))
		default:
			errs = append(errs, fmt.Errorf("%w: the record changed at revision %d (rule record-revision)", ErrConflict, kvs[0].ModRevision))
		}
	}
	for i, h := range t.Fenced {
		fk := resp.Responses[1+i].GetResponseRange().Kvs
		if len(fk) == 0 || fk[0].ModRevision <= t.ExpectRev {
			errs = append(errs, fmt.Errorf("host %s: %w (rule fenced-for-record)", h, ErrNotFenced))
		}
	}
	errs = append(errs, c.ownerErrs(ctx, t.Owner)...)
	if len(errs) == 0 {
		errs = append(errs, fmt.Errorf("%w: read again", ErrConflict))
	}
	return VM{}, fmt.Errorf("%s: %w", op, errors.Join(errs...))
}

// ownerErrs explains why a new owner was refused (a second read: only on
// a refusal).
func (c *Client) ownerErrs(ctx context.Context, owner string) []error {
	v, err := c.Hosts(ctx, owner)
	if err != nil {
		return nil
	}
	h := v.Hosts[owner]
	switch {
	case h.Enrolment == nil:
		return []error{fmt.Errorf("host %s: %w (rule enrolled)", owner, ErrNotEnrolled)}
	case h.State == StateFenced:
		return []error{fmt.Errorf("host %s: %w (rule host-fenced)", owner, ErrHostFenced)}
	case h.State != StateActive:
		return []error{fmt.Errorf("host %s is %s: %w (rule host-active)", owner, h.State, ErrHostNotActive)}
	}
	return nil
}

// LeaseLost reports whether this host had a liveness lease and it is gone
// now (self-fencing of key use, issue 15): false before the first
// registration.
func (c *Client) LeaseLost() bool {
	until := c.liveUntil.Load()
	return until != 0 && c.cfg.Now().UnixNano() >= until
}

// Reassert rewrites a VM record unchanged if it is still exactly expect at
// revision rev: its revision moves past every fence record written so far,
// so an owner whose fencer never promoted takes its VM back (model finding
// F11) and the fencer's TakeOver, compared against the old revision, fails.
func (c *Client) Reassert(ctx context.Context, expect VM, rev int64) (int64, error) {
	op := "registry: reassert " + expect.ID
	val, err := vmValue(expect)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", op, err)
	}
	key := c.k.vm(expect.ID)
	var resp *clientv3.TxnResponse
	err = c.do(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Txn(ctx).If(clientv3.Compare(clientv3.Value(key), "=", val), clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
			Then(clientv3.OpPut(key, val)).Commit()
		return err
	})
	if err != nil {
		return 0, err
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("%s: %w: the record changed since revision %d", op, ErrConflict, rev)
	}
	return resp.Header.Revision, nil
}

// Abandon makes the next Close leave the liveness lease to expire by
// itself instead of revoking it: a host that crashed or lost power (tests
// and the in-process fleet's crash).
func (c *Client) Abandon() { c.abandon.Store(true) }
