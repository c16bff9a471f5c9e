package registry

import (
	"context"
	"errors"
	"fmt"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

func vmValue(v VM) (string, error) {
	v.V = Version
	b, err := encode(&v)
	return string(b), err
}

// CreateVM implements Ownership: one transaction.
func (c *Client) CreateVM(ctx context.Context, vmID, owner string) (VM, error) {
	op := "registry: create VM " + vmID
	vm := VM{V: Version, ID: vmID, Owner: owner, Generation: 1}
	val, err := vmValue(vm)
	if err != nil {
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	key := c.k.vm(vmID)
	var resp *clientv3.TxnResponse
	err = c.do(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0),
				clientv3.Compare(clientv3.Value(c.k.state(owner)), "!=", stateValue(StateFenced)),
				clientv3.Compare(clientv3.CreateRevision(c.k.enrol(owner)), ">", 0)).
			Then(clientv3.OpPut(key, val)).
			Else(clientv3.OpGet(key), clientv3.OpGet(c.k.state(owner)), clientv3.OpGet(c.k.enrol(owner), clientv3.WithKeysOnly())).
			Commit()
		return err
	})
	if err != nil {
		return VM{}, err
	}
	if resp.Succeeded {
		c.cache.put(resp.Header.Revision, []VM{vm}, nil, false)
		return vm, nil
	}
	var errs []error
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
		errs = append(errs, fmt.Errorf("%w (rule create-once)", ErrExists))
	}
	errs = append(errs, hostErrs(owner, resp.Responses[1], resp.Responses[2], false)...)
	return VM{}, fmt.Errorf("%s: %w", op, errors.Join(errs...))
}

// hostErrs explains why a host failed a CAS condition, from the Else
// branch's reads of its state and enrolment. active asks for "active"
// (Begin), otherwise only "not fenced".
func hostErrs(host string, state, enrol *etcdserverpb.ResponseOp, active bool) []error {
	var errs []error
	if len(enrol.GetResponseRange().Kvs) == 0 {
		errs = append(errs, fmt.Errorf("host %s: %w (rule enrolled)", host, ErrNotEnrolled))
	}
	kvs := state.GetResponseRange().Kvs
	if len(kvs) == 0 {
		if len(errs) == 0 {
			errs = append(errs, fmt.Errorf("host %s: %w: no state record (rule host-active)", host, ErrHostNotActive))
		}
		return errs
	}
	s, err := decodeState(kvs[0].Value)
	switch {
	case err != nil:
		errs = append(errs, fmt.Errorf("host %s: state: %w", host, err))
	case s == StateFenced:
		errs = append(errs, fmt.Errorf("host %s: %w (rule host-fenced)", host, ErrHostFenced))
	case active && s != StateActive:
		errs = append(errs, fmt.Errorf("host %s is %s: %w (rule host-active)", host, s, ErrHostNotActive))
	}
	return errs
}

// VMs implements Ownership. Named VMs are read with one transaction of
// Gets per Config.MaxTxnOps VMs (later chunks at the first one's
// revision, so the view is consistent); all VMs with one range read.
func (c *Client) VMs(ctx context.Context, ids ...string) (View, error) {
	const op = "registry: read VMs"
	if len(ids) == 0 {
		return c.allVMs(ctx, c.kv)
	}
	for _, id := range ids {
		if err := validID("VM", id); err != nil {
			return View{}, fmt.Errorf("%s: %w", op, err)
		}
	}
	v := View{VMs: map[string]VM{}}
	var errs []error
	var absent []string
	for start := 0; start < len(ids); start += c.cfg.MaxTxnOps {
		chunk := ids[start:min(start+c.cfg.MaxTxnOps, len(ids))]
		var getOpts []clientv3.OpOption
		if v.Rev != 0 {
			getOpts = append(getOpts, clientv3.WithRev(v.Rev))
		}
		ops := make([]clientv3.Op, len(chunk))
		for i, id := range chunk {
			ops[i] = clientv3.OpGet(c.k.vm(id), getOpts...)
		}
		var resp *clientv3.TxnResponse
		err := c.read(ctx, op, func(ctx context.Context) (err error) {
			resp, err = c.kv.Txn(ctx).Then(ops...).Commit()
			return err
		})
		if err != nil {
			return View{}, err
		}
		if v.Rev == 0 {
			v.Rev = resp.Header.Revision
		}
		for i, r := range resp.Responses {
			kvs := r.GetResponseRange().Kvs
			if len(kvs) == 0 {
				absent = append(absent, chunk[i])
				continue
			}
			vm, err := c.decodeVMKV(kvs[0])
			if err != nil {
				errs = append(errs, err)
				continue
			}
			v.VMs[vm.ID] = vm
		}
	}
	c.cache.put(v.Rev, mapValues(v.VMs), absent, false)
	return v, joinOp(op, errs)
}

// allVMs reads every VM record with one range read through kv.
func (c *Client) allVMs(ctx context.Context, kv clientv3.KV) (View, error) {
	const op = "registry: read VMs"
	var resp *clientv3.GetResponse
	err := c.read(ctx, op, func(ctx context.Context) (err error) {
		resp, err = kv.Get(ctx, c.k.vms(), clientv3.WithPrefix())
		return err
	})
	if err != nil {
		return View{}, err
	}
	v := View{Rev: resp.Header.Revision, VMs: map[string]VM{}}
	var errs []error
	for _, kv := range resp.Kvs {
		vm, err := c.decodeVMKV(kv)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		v.VMs[vm.ID] = vm
	}
	c.cache.put(v.Rev, mapValues(v.VMs), nil, true)
	return v, joinOp(op, errs)
}

// decodeVMKV decodes a VM record and checks it is stored under its own ID.
func (c *Client) decodeVMKV(kv *mvccpb.KeyValue) (VM, error) {
	vm, err := DecodeVM(kv.Value)
	if err != nil {
		return VM{}, fmt.Errorf("%s: %w", kv.Key, err)
	}
	if c.k.vm(vm.ID) != string(kv.Key) {
		return VM{}, fmt.Errorf("%s: %w: record of VM %s", kv.Key, ErrBadRecord, vm.ID)
	}
	return vm, nil
}

func mapValues(m map[string]VM) []VM {
	out := make([]VM, 0, len(m))
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

func joinOp(op string, errs []error) error {
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("%s: %w", op, errors.Join(errs...))
}

// Cached implements Ownership.
func (c *Client) Cached(ids ...string) View { return c.cache.view(ids) }

// WaitRev waits until this host's last view has reached revision rev (a
// revision another host's change returned, which the watch delivers), or
// ctx ends. Without the watch (Config.NoFollow) it fails at once: only
// this host's own reads and writes would move the view.
func (c *Client) WaitRev(ctx context.Context, rev int64) error {
	if c.cfg.NoFollow {
		return fmt.Errorf("registry: wait for revision %d: %w: this client does not follow the registry", rev, ErrConfig)
	}
	return c.cache.waitRev(ctx, rev)
}

// checkBatch validates a batch and the transaction's size.
func (c *Client) checkBatch(b Batch, needTx bool) error {
	if needTx || b.TxID != "" {
		if err := validID("transaction", b.TxID); err != nil {
			return err
		}
	}
	if err := validHost(b.From); err != nil {
		return err
	}
	if err := validHost(b.To); err != nil {
		return err
	}
	if b.From == b.To && b.TxID == "" {
		// A transaction from a host to itself is a restore onto the VM's
		// owner (its TPM was replaced and it was re-enrolled): only with
		// the restore's transaction, never a commit without Begin.
		return fmt.Errorf("%w: source and destination are both %s without a transaction", ErrBadRecord, b.From)
	}
	if len(b.VMs) == 0 {
		return fmt.Errorf("%w: empty batch", ErrBadRecord)
	}
	if len(b.VMs)+2 > c.cfg.MaxTxnOps {
		return fmt.Errorf("%w: %d VMs, at most %d per transaction (max_txn_ops %d)", ErrBatchTooLarge, len(b.VMs), c.cfg.MaxTxnOps-2, c.cfg.MaxTxnOps)
	}
	seen := map[string]bool{}
	for _, v := range b.VMs {
		if err := validID("VM", v.ID); err != nil {
			return err
		}
		if seen[v.ID] {
			return fmt.Errorf("%w: VM %s twice in the batch", ErrBadRecord, v.ID)
		}
		seen[v.ID] = true
		if err := validGeneration(v.Generation); err != nil {
			return fmt.Errorf("VM %s: %w (rule generation-bounds)", v.ID, err)
		}
	}
	return nil
}

// casStep describes one of Begin, Commit and Abort: per VM, the record
// expected and the record written; for the destination, what it must be.
type casStep struct {
	op         string
	expect     func(VMGen) VM
	next       func(VMGen) VM
	hostCmps   func() []clientv3.Cmp
	hostActive bool
}

// Begin implements Ownership: one transaction.
func (c *Client) Begin(ctx context.Context, b Batch) ([]VM, error) {
	for _, v := range b.VMs {
		if v.Generation >= MaxGeneration {
			return nil, fmt.Errorf("registry: begin %s: VM %s: %w: generation %d cannot be raised (rule generation-bounds)", b.TxID, v.ID, ErrGenerationBounds, v.Generation)
		}
	}
	tx := &OpenTx{ID: b.TxID, To: b.To}
	return c.cas(ctx, b, true, casStep{
		op:     "registry: begin " + b.TxID,
		expect: func(v VMGen) VM { return VM{ID: v.ID, Owner: b.From, Generation: v.Generation} },
		next:   func(v VMGen) VM { return VM{ID: v.ID, Owner: b.From, Generation: v.Generation, Tx: tx} },
		hostCmps: func() []clientv3.Cmp {
			return []clientv3.Cmp{
				clientv3.Compare(clientv3.Value(c.k.state(b.To)), "=", stateValue(StateActive)),
				clientv3.Compare(clientv3.CreateRevision(c.k.enrol(b.To)), ">", 0),
			}
		},
		hostActive: true,
	})
}

// Commit implements Ownership: one transaction.
func (c *Client) Commit(ctx context.Context, b Batch) ([]VM, error) {
	for _, v := range b.VMs {
		if v.Generation >= MaxGeneration {
			return nil, fmt.Errorf("registry: commit %s: VM %s: %w: generation %d cannot be raised (rule generation-bounds)", b.TxID, v.ID, ErrGenerationBounds, v.Generation)
		}
	}
	var tx *OpenTx
	if b.TxID != "" {
		tx = &OpenTx{ID: b.TxID, To: b.To}
	}
	return c.cas(ctx, b, false, casStep{
		op:     "registry: commit " + b.TxID,
		expect: func(v VMGen) VM { return VM{ID: v.ID, Owner: b.From, Generation: v.Generation, Tx: tx} },
		next:   func(v VMGen) VM { return VM{ID: v.ID, Owner: b.To, Generation: v.Generation + 1} },
		hostCmps: func() []clientv3.Cmp {
			return []clientv3.Cmp{
				clientv3.Compare(clientv3.Value(c.k.state(b.To)), "!=", stateValue(StateFenced)),
				clientv3.Compare(clientv3.CreateRevision(c.k.enrol(b.To)), ">", 0),
			}
		},
	})
}

// Abort implements Ownership: one transaction.
func (c *Client) Abort(ctx context.Context, b Batch) ([]VM, error) {
	tx := &OpenTx{ID: b.TxID, To: b.To}
	return c.cas(ctx, b, true, casStep{
		op:     "registry: abort " + b.TxID,
		expect: func(v VMGen) VM { return VM{ID: v.ID, Owner: b.From, Generation: v.Generation, Tx: tx} },
		next:   func(v VMGen) VM { return VM{ID: v.ID, Owner: b.From, Generation: v.Generation} },
	})
}

// cas runs one batch compare-and-swap. On a refusal the Else branch reads
// every VM and the destination, so the error names each VM and the rule it
// failed at no extra round trip; if every VM already is as the change
// would leave it (a retried change that took effect), it succeeds.
func (c *Client) cas(ctx context.Context, b Batch, needTx bool, s casStep) ([]VM, error) {
	if err := c.checkBatch(b, needTx); err != nil {
		return nil, fmt.Errorf("%s: %w", s.op, err)
	}
	n := len(b.VMs)
	cmps := make([]clientv3.Cmp, 0, n+2)
	thens := make([]clientv3.Op, 0, n)
	elses := make([]clientv3.Op, 0, n+2)
	nexts := make([]VM, 0, n)
	expects := make([]string, 0, n)
	for _, v := range b.VMs {
		exp, err := vmValue(s.expect(v))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s.op, err)
		}
		nv := s.next(v)
		nv.V = Version
		nxt, err := vmValue(nv)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s.op, err)
		}
		key := c.k.vm(v.ID)
		cmps = append(cmps, clientv3.Compare(clientv3.Value(key), "=", exp))
		thens = append(thens, clientv3.OpPut(key, nxt))
		elses = append(elses, clientv3.OpGet(key))
		nexts = append(nexts, nv)
		expects = append(expects, exp)
	}
	if s.hostCmps != nil {
		cmps = append(cmps, s.hostCmps()...)
		elses = append(elses, clientv3.OpGet(c.k.state(b.To)), clientv3.OpGet(c.k.enrol(b.To), clientv3.WithKeysOnly()))
	}
	var resp *clientv3.TxnResponse
	err := c.do(ctx, s.op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Txn(ctx).If(cmps...).Then(thens...).Else(elses...).Commit()
		return err
	})
	if err != nil {
		return nil, err
	}
	if resp.Succeeded {
		c.cache.put(resp.Header.Revision, nexts, nil, false)
		return nexts, nil
	}
	// Refused: explain from the current records.
	var errs []error
	var current []VM
	var absent []string
	done := true
	for i, v := range b.VMs {
		kvs := resp.Responses[i].GetResponseRange().Kvs
		if len(kvs) == 0 {
			absent = append(absent, v.ID)
			done = false
			errs = append(errs, fmt.Errorf("VM %s: %w (rule vm-present)", v.ID, ErrNotFound))
			continue
		}
		if string(kvs[0].Value) == expects[i] {
			done = false
			continue // this VM was fine; another condition failed
		}
		cur, err := c.decodeVMKV(kvs[0])
		if err != nil {
			done = false
			errs = append(errs, err)
			continue
		}
		current = append(current, cur)
		want := nexts[i]
		if cur.Owner == want.Owner && cur.Generation == want.Generation && cur.Tx.equal(want.Tx) {
			continue // already as this change leaves it
		}
		done = false
		exp := s.expect(v)
		switch {
		case cur.Owner != exp.Owner:
			errs = append(errs, fmt.Errorf("VM %s: %w: owner is %s at generation %d, not %s (rule owner)", v.ID, ErrWrongOwner, cur.Owner, cur.Generation, exp.Owner))
		case cur.Generation != exp.Generation:
			errs = append(errs, fmt.Errorf("VM %s: %w: generation is %d, not %d (rule generation)", v.ID, ErrStaleGeneration, cur.Generation, exp.Generation))
		default:
			errs = append(errs, fmt.Errorf("VM %s: %w: open transaction %s, expected %s (rule open-transaction)", v.ID, ErrBusy, cur.Tx.String(), exp.Tx.String()))
		}
	}
	c.cache.put(resp.Header.Revision, current, absent, false)
	if done && len(errs) == 0 {
		return nexts, nil // a retry of a change that took effect
	}
	if s.hostCmps != nil {
		errs = append(errs, hostErrs(b.To, resp.Responses[n], resp.Responses[n+1], s.hostActive)...)
	}
	if len(errs) == 0 {
		errs = append(errs, fmt.Errorf("%w: the records changed during the change; read again", ErrConflict))
	}
	return nil, fmt.Errorf("%s: %w", s.op, errors.Join(errs...))
}

func (t *OpenTx) equal(o *OpenTx) bool {
	if t == nil || o == nil {
		return t == o
	}
	return *t == *o
}

func (t *OpenTx) String() string {
	if t == nil {
		return "none"
	}
	return t.ID + " to " + t.To
}

// Bump implements Ownership: one transaction.
func (c *Client) Bump(ctx context.Context, b Bump) (VM, error) {
	op := "registry: bump " + b.VM
	if err := validID("VM", b.VM); err != nil {
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	if err := validGeneration(b.Generation); err != nil {
		return VM{}, fmt.Errorf("%s: %w (rule generation-bounds)", op, err)
	}
	key := c.k.vm(b.VM)
	var cmps []clientv3.Cmp
	if b.Expect == nil {
		if b.OwnerNotLive {
			return VM{}, fmt.Errorf("%s: %w: owner-not-live needs the record read", op, ErrBadRecord)
		}
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", 0))
	} else {
		if b.Expect.ID != b.VM {
			return VM{}, fmt.Errorf("%s: %w: expected record is of VM %s", op, ErrBadRecord, b.Expect.ID)
		}
		if b.Generation <= b.Expect.Generation {
			return VM{}, fmt.Errorf("%s: %w: %d does not raise generation %d (rule generation-bounds)", op, ErrGenerationBounds, b.Generation, b.Expect.Generation)
		}
		exp, err := vmValue(*b.Expect)
		if err != nil {
			return VM{}, fmt.Errorf("%s: %w", op, err)
		}
		cmps = append(cmps, clientv3.Compare(clientv3.Value(key), "=", exp))
	}
	next := VM{V: Version, ID: b.VM, Owner: b.Owner, Generation: b.Generation}
	val, err := vmValue(next)
	if err != nil {
		return VM{}, fmt.Errorf("%s: %w", op, err)
	}
	cmps = append(cmps,
		clientv3.Compare(clientv3.Value(c.k.state(b.Owner)), "!=", stateValue(StateFenced)),
		clientv3.Compare(clientv3.CreateRevision(c.k.enrol(b.Owner)), ">", 0))
	elses := []clientv3.Op{clientv3.OpGet(key), clientv3.OpGet(c.k.state(b.Owner)), clientv3.OpGet(c.k.enrol(b.Owner), clientv3.WithKeysOnly())}
	if b.OwnerNotLive {
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(c.k.live(b.Expect.Owner)), "=", 0))
		elses = append(elses, clientv3.OpGet(c.k.live(b.Expect.Owner), clientv3.WithKeysOnly()))
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
	case len(kvs) == 0 && b.Expect != nil:
		c.cache.put(resp.Header.Revision, nil, []string{b.VM}, false)
		errs = append(errs, fmt.Errorf("%w (rule vm-present)", ErrNotFound))
	case len(kvs) > 0 && b.Expect == nil:
		errs = append(errs, fmt.Errorf("%w: the VM is recorded; bump the record read (rule expect)", ErrExists))
	case len(kvs) > 0:
		cur, err := c.decodeVMKV(kvs[0])
		if err != nil {
			errs = append(errs, err)
			break
		}
		c.cache.put(resp.Header.Revision, []VM{cur}, nil, false)
		switch {
		case cur.Owner != b.Expect.Owner:
			errs = append(errs, fmt.Errorf("%w: owner is %s at generation %d, not %s (rule owner)", ErrWrongOwner, cur.Owner, cur.Generation, b.Expect.Owner))
		case cur.Generation != b.Expect.Generation:
			errs = append(errs, fmt.Errorf("%w: generation is %d, not %d (rule generation)", ErrStaleGeneration, cur.Generation, b.Expect.Generation))
		case !cur.Tx.equal(b.Expect.Tx):
			errs = append(errs, fmt.Errorf("%w: open transaction %s, expected %s (rule open-transaction)", ErrBusy, cur.Tx, b.Expect.Tx))
		}
	}
	errs = append(errs, hostErrs(b.Owner, resp.Responses[1], resp.Responses[2], false)...)
	if b.OwnerNotLive && len(resp.Responses[3].GetResponseRange().Kvs) > 0 {
		errs = append(errs, fmt.Errorf("host %s: %w (rule owner-not-live)", b.Expect.Owner, ErrHostLive))
	}
	if len(errs) == 0 {
		errs = append(errs, fmt.Errorf("%w: read again", ErrConflict))
	}
	return VM{}, fmt.Errorf("%s: %w", op, errors.Join(errs...))
}

// putVMIf writes a VM's record (key, val: next) if every comparison
// holds, else reads elses (one transaction), and caches the record it
// wrote: Bump's and TakeOver's write.
func (c *Client) putVMIf(ctx context.Context, op, key, val string, next VM, cmps []clientv3.Cmp, elses []clientv3.Op) (*clientv3.TxnResponse, error) {
	var resp *clientv3.TxnResponse
	err := c.do(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Txn(ctx).If(cmps...).Then(clientv3.OpPut(key, val)).Else(elses...).Commit()
		return err
	})
	if err != nil {
		return nil, err
	}
	if resp.Succeeded {
		c.cache.put(resp.Header.Revision, []VM{next}, nil, false)
	}
	return resp, nil
}
