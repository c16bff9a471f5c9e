package registry

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Register implements Fleet. It costs one lease grant (the first time)
// and one transaction.
func (c *Client) Register(ctx context.Context, h Host) error {
	op := "registry: register " + h.Name
	h.V = Version
	if h.Name != c.cfg.Host {
		return fmt.Errorf("%s: %w: a host registers itself only (this is %s)", op, ErrConfig, c.cfg.Host)
	}
	val, err := encode(&h)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	c.liveMu.Lock()
	defer c.liveMu.Unlock()
	if err := c.putLive(ctx, op, string(val)); err != nil {
		return err
	}
	c.liveHost = &h
	if !c.keeping {
		c.keeping = true
		c.wg.Add(1)
		go c.keepLive()
	}
	return nil
}

// putLive grants a lease if there is none and writes the host record and
// its liveness key. Called with liveMu held.
func (c *Client) putLive(ctx context.Context, op, hostVal string) error {
	if c.lease == 0 {
		ttl := int64(math.Ceil(c.cfg.TTL.Seconds()))
		err := c.do(ctx, op+": grant lease", func(ctx context.Context) error {
			resp, err := c.cli.Grant(ctx, ttl)
			if err == nil {
				c.lease = resp.ID
				c.liveUntil.Store(c.cfg.Now().Add(time.Duration(resp.TTL) * time.Second).UnixNano())
			}
			return err
		})
		if err != nil {
			return err
		}
	}
	live, _ := json.Marshal(&liveRecord{V: Version, Host: c.cfg.Host, Since: c.cfg.Now().UTC()})
	ops := []clientv3.Op{clientv3.OpPut(c.k.live(c.cfg.Host), string(live), clientv3.WithLease(c.lease))}
	if hostVal != "" {
		ops = append(ops, clientv3.OpPut(c.k.host(c.cfg.Host), hostVal))
	}
	return c.do(ctx, op, func(ctx context.Context) error {
		_, err := c.kv.Txn(ctx).Then(ops...).Commit()
		return err
	})
}

// keepLive keeps the lease alive; when it is lost (expired during a
// partition, revoked), it grants a new one and rewrites the liveness key,
// retrying every TTL/3, until Close.
func (c *Client) keepLive() {
	defer c.wg.Done()
	retry := c.cfg.TTL / 3
	for c.bg.Err() == nil {
		c.liveMu.Lock()
		lease := c.lease
		c.liveMu.Unlock()
		if lease != 0 {
			ch, err := c.cli.KeepAlive(c.bg, lease)
			if err == nil {
				for resp := range ch {
					c.liveUntil.Store(c.cfg.Now().Add(time.Duration(resp.TTL) * time.Second).UnixNano())
				}
			}
			if c.bg.Err() != nil {
				return
			}
			c.log.WithField("lease", int64(lease)).Warn("liveness lease lost; re-registering")
			c.liveMu.Lock()
			if c.lease == lease {
				c.lease = 0
			}
			c.liveMu.Unlock()
		}
		select {
		case <-c.bg.Done():
			return
		case <-time.After(retry):
		}
		c.liveMu.Lock()
		if c.lease == 0 && c.liveHost != nil {
			if err := c.putLive(c.bg, "registry: re-register "+c.cfg.Host, ""); err != nil {
				c.log.WithError(err).Warn("re-registering liveness failed; retrying")
			}
		}
		c.liveMu.Unlock()
	}
}

// Live reports whether this host's liveness lease is known to be alive
// now (the last keep-alive answer plus its TTL is in the future). A host
// whose lease is gone must assume a standby may take its VMs over
// (issue 15: it stops handing out their keys).
func (c *Client) Live() bool {
	return c.cfg.Now().UnixNano() < c.liveUntil.Load()
}

// Hosts implements Fleet: one round trip.
func (c *Client) Hosts(ctx context.Context, names ...string) (HostsView, error) {
	for _, n := range names {
		if err := validHost(n); err != nil {
			return HostsView{}, fmt.Errorf("registry: hosts: %w", err)
		}
	}
	var ops []clientv3.Op
	perName := len(names) > 0 && 4*len(names) <= c.cfg.MaxTxnOps
	if perName {
		for _, n := range names {
			ops = append(ops, clientv3.OpGet(c.k.host(n)), clientv3.OpGet(c.k.state(n)), clientv3.OpGet(c.k.live(n)), clientv3.OpGet(c.k.enrol(n)))
		}
	} else {
		for _, p := range []string{c.k.hosts(), c.k.states(), c.k.lives(), c.k.enrols()} {
			ops = append(ops, clientv3.OpGet(p, clientv3.WithPrefix()))
		}
	}
	var resp *clientv3.TxnResponse
	err := c.read(ctx, "registry: hosts", func(ctx context.Context) (err error) {
		resp, err = c.kv.Txn(ctx).Then(ops...).Commit()
		return err
	})
	if err != nil {
		return HostsView{}, err
	}
	view := HostsView{Rev: resp.Header.Revision, Hosts: map[string]HostView{}}
	get := func(name string) HostView {
		hv, ok := view.Hosts[name]
		if !ok {
			hv.Name = name
		}
		return hv
	}
	for _, r := range resp.Responses {
		for _, kv := range r.GetResponseRange().Kvs {
			key := string(kv.Key)
			dir, name, ok := strings.Cut(strings.TrimPrefix(key, c.cfg.Prefix), "/")
			if !ok || validHost(name) != nil {
				continue
			}
			hv := get(name)
			switch dir {
			case "hosts":
				h, err := DecodeHost(kv.Value)
				if err != nil {
					return HostsView{}, fmt.Errorf("registry: hosts: %s: %w", key, err)
				}
				hv.Host = &h
			case "state":
				s, err := decodeState(kv.Value)
				if err != nil {
					return HostsView{}, fmt.Errorf("registry: hosts: %s: %w", key, err)
				}
				hv.State = s
			case "live":
				hv.Live = true
			case "enrol":
				e, err := DecodeEnrolment(kv.Value)
				if err != nil {
					return HostsView{}, fmt.Errorf("registry: hosts: %s: %w", key, err)
				}
				hv.Enrolment = &e
			default:
				continue
			}
			view.Hosts[name] = hv
		}
	}
	if len(names) > 0 && !perName {
		want := map[string]bool{}
		for _, n := range names {
			want[n] = true
		}
		for n := range view.Hosts {
			if !want[n] {
				delete(view.Hosts, n)
			}
		}
	}
	return view, nil
}

// WatchLiveness implements Fleet. Watches are streams, not KV round trips.
func (c *Client) WatchLiveness(ctx context.Context, fromRev int64) <-chan LivenessEvent {
	out := make(chan LivenessEvent, 16)
	opts := []clientv3.OpOption{clientv3.WithPrefix()}
	if fromRev > 0 {
		opts = append(opts, clientv3.WithRev(fromRev))
	}
	wch := c.cli.Watch(clientv3.WithRequireLeader(ctx), c.k.lives(), opts...)
	go func() {
		defer close(out)
		send := func(e LivenessEvent) bool {
			select {
			case out <- e:
				return true
			case <-ctx.Done():
				return false
			}
		}
		for resp := range wch {
			if err := resp.Err(); err != nil {
				send(LivenessEvent{Rev: resp.Header.Revision, Err: fmt.Errorf("registry: watch liveness: %w", c.classify(ctx, err))})
				return
			}
			for _, ev := range resp.Events {
				name := strings.TrimPrefix(string(ev.Kv.Key), c.k.lives())
				if validHost(name) != nil {
					continue
				}
				if !send(LivenessEvent{Host: name, Live: ev.Type == clientv3.EventTypePut, Rev: ev.Kv.ModRevision}) {
					return
				}
			}
		}
		if ctx.Err() == nil {
			send(LivenessEvent{Err: fmt.Errorf("registry: watch liveness: %w: watch ended", ErrNoQuorum)})
		}
	}()
	return out
}

// Enroll implements Fleet: one transaction that writes the enrolment if
// there is none and makes the host active unless it already has a state
// (a fenced host stays fenced). Enrolling the same identity again is a
// no-op; another identity fails with ErrExists.
func (c *Client) Enroll(ctx context.Context, e Enrolment) error {
	op := "registry: enrol " + e.Host
	e.V = Version
	e.Replaced = nil // written by Reenroll only
	if e.At.IsZero() {
		e.At = c.cfg.Now().UTC()
	}
	if e.By == "" {
		e.By = c.cfg.Host
	}
	val, err := encode(&e)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	ek, sk := c.k.enrol(e.Host), c.k.state(e.Host)
	var resp *clientv3.TxnResponse
	err = c.do(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(ek), "=", 0)).
			Then(clientv3.OpPut(ek, string(val)),
				clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(sk), "=", 0)},
					[]clientv3.Op{clientv3.OpPut(sk, stateValue(StateActive))}, nil)).
			Else(clientv3.OpGet(ek)).Commit()
		return err
	})
	if err != nil {
		return err
	}
	if resp.Succeeded {
		return nil
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 1 {
		if old, err := DecodeEnrolment(kvs[0].Value); err == nil && old.Identity == e.Identity {
			return nil
		}
	}
	return fmt.Errorf("%s: %w: the host is enrolled with another TPM identity (rule enrolled-once); if its TPM was replaced: vtpmctl host retire, then vtpmctl host reenroll", op, ErrExists)
}

// SetState implements Fleet: one transaction; the host must be enrolled.
func (c *Client) SetState(ctx context.Context, host string, s HostState) error {
	op := fmt.Sprintf("registry: set %s %s", host, s)
	if err := validHost(host); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if !s.valid() {
		return fmt.Errorf("%s: %w: state %q", op, ErrBadRecord, s)
	}
	var resp *clientv3.TxnResponse
	err := c.do(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(c.k.enrol(host)), ">", 0)).
			Then(clientv3.OpPut(c.k.state(host), stateValue(s))).Commit()
		return err
	})
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		return fmt.Errorf("%s: %w (rule enrolled)", op, ErrNotEnrolled)
	}
	return nil
}
