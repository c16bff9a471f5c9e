package registry

import (
	"context"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// followVMs keeps the last view (Cached) current: it watches every VM
// record from the revision of a first full read, so a host's last view
// includes changes other hosts made (the destination of a migration learns
// the source's Commit). A broken watch (no quorum, compaction) is resumed
// after a new full read, with backoff, until Close. Watches are a stream:
// they cost no round trips on the hosts' request paths.
func (c *Client) followVMs() {
	defer c.wg.Done()
	backoff := 100 * time.Millisecond
	for c.bg.Err() == nil {
		v, err := c.allVMs(c.bg, c.cli.KV) // a full read (not counted: not on a request path)
		if err == nil || v.Rev > 0 {
			backoff = 100 * time.Millisecond
			c.watchVMs(v.Rev + 1)
		}
		select {
		case <-c.bg.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, c.cfg.TTL)
	}
}

func (c *Client) watchVMs(from int64) {
	ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(c.bg))
	defer cancel()
	for resp := range c.cli.Watch(ctx, c.k.vms(), clientv3.WithPrefix(), clientv3.WithRev(from)) {
		if resp.Err() != nil {
			return
		}
		for _, ev := range resp.Events {
			id := string(ev.Kv.Key[len(c.k.vms()):])
			if ev.Type == clientv3.EventTypeDelete {
				c.cache.put(ev.Kv.ModRevision, nil, []string{id}, false)
				continue
			}
			vm, err := c.decodeVMKV(ev.Kv)
			if err != nil {
				c.log.WithError(err).Warn("ignoring a malformed VM record in the watch")
				continue
			}
			c.cache.put(ev.Kv.ModRevision, []VM{vm}, nil, false)
		}
		if resp.Header.Revision > 0 {
			c.cache.advance(resp.Header.Revision)
		}
	}
}

// EnrolmentChanges counts the changes of enrolment records (enrol/) this
// client's watch has seen (and every time the watch had to start
// again, when it may have missed some): a cache of the hosts' enrolments
// (the verifier's, in vtpmd) read when the count was n is stale once the
// count is above n, at once rather than after its age (a host re-enrolled
// with a new TPM is never verified against its old identity from a cached
// view). Without following (Config.NoFollow) it stays 0.
func (c *Client) EnrolmentChanges() uint64 { return c.enrolChanges.Load() }

// followEnrolments watches enrol/ until Close, counting changes.
func (c *Client) followEnrolments() {
	defer c.wg.Done()
	for c.bg.Err() == nil {
		c.enrolChanges.Add(1) // the watch (re)starts: changes may have been missed
		ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(c.bg))
		for resp := range c.cli.Watch(ctx, c.k.enrols(), clientv3.WithPrefix()) {
			if resp.Err() != nil {
				break
			}
			c.enrolChanges.Add(uint64(len(resp.Events)))
		}
		cancel()
		select {
		case <-c.bg.Done():
			return
		case <-time.After(c.cfg.TTL / 3):
		}
	}
}
