package attest

import (
	"crypto/sha256"
	"encoding/binary"
	"hash/maphash"
	"sync"
)

// The verifier caches what does not change between two verifications of a
// known host: parsed public areas, verified certificate paths and parsed,
// replayed event logs. Every cache is bounded, safe for concurrent use and
// keyed by a SHA-256 digest over the exact bytes (and the policy knobs) the
// entry stands for, so a changed input is a different key and is verified
// from scratch. Event logs are the exception, for speed: they are looked up
// by a seeded 64-bit hash and served only when the stored copy is
// byte-for-byte equal (see run.eventLog). Only successful outcomes are
// cached; refusals are always recomputed. Entries are immutable once
// stored.

// Cache bounds. An event log entry costs twice the size of the log (the
// stored copy and the parsed events).
const (
	maxCachedPublics   = 4096
	maxCachedPaths     = 1024
	maxCachedLogs      = 256
	maxCachedLogBytes  = 64 << 20
	maxCacheableLogLen = 4 << 20 // larger logs are parsed every time
)

// cacheKey is SHA-256 over a domain label and length-prefixed parts, so
// that no two different inputs share a key.
type cacheKey [32]byte

func keyOf(domain string, parts ...[]byte) cacheKey {
	h := sha256.New()
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(len(domain)))
	h.Write(n[:])
	h.Write([]byte(domain))
	for _, p := range parts {
		binary.BigEndian.PutUint64(n[:], uint64(len(p)))
		h.Write(n[:])
		h.Write(p)
	}
	var k cacheKey
	h.Sum(k[:0])
	return k
}

// boundedCache maps keys to immutable values. It holds at most maxEntries
// entries and at most maxCost total cost; when a new entry does not fit,
// the oldest entries are evicted first (FIFO).
type boundedCache[V any] struct {
	maxEntries int
	maxCost    int

	mu    sync.Mutex
	m     map[cacheKey]cacheEntry[V]
	queue []cacheKey // insertion order; may hold keys already evicted
	cost  int
}

type cacheEntry[V any] struct {
	v    V
	cost int
}

func newBoundedCache[V any](maxEntries, maxCost int) *boundedCache[V] {
	return &boundedCache[V]{maxEntries: maxEntries, maxCost: maxCost, m: map[cacheKey]cacheEntry[V]{}}
}

func (c *boundedCache[V]) get(k cacheKey) (V, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[k]
	return e.v, ok
}

// put stores v under k unless its cost alone exceeds the budget.
func (c *boundedCache[V]) put(k cacheKey, v V, cost int) {
	if cost > c.maxCost {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if old, ok := c.m[k]; ok {
		c.cost -= old.cost
		delete(c.m, k)
	}
	for len(c.queue) > 0 && (len(c.m) >= c.maxEntries || c.cost+cost > c.maxCost) {
		oldest := c.queue[0]
		c.queue = c.queue[1:]
		if e, ok := c.m[oldest]; ok {
			c.cost -= e.cost
			delete(c.m, oldest)
		}
	}
	c.m[k] = cacheEntry[V]{v: v, cost: cost}
	c.cost += cost
	c.queue = append(c.queue, k)
	if len(c.queue) > 4*c.maxEntries { // drop keys of replaced entries
		live := c.queue[:0]
		seen := map[cacheKey]bool{}
		for _, q := range c.queue {
			if _, ok := c.m[q]; ok && !seen[q] {
				seen[q] = true
				live = append(live, q)
			}
		}
		c.queue = append([]cacheKey(nil), live...)
	}
}

func (c *boundedCache[V]) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}

// verifierCache holds a Verifier's caches.
type verifierCache struct {
	logSeed  maphash.Seed
	publics  *boundedCache[*Public]
	ekPaths  *boundedCache[*pathCheck]
	akChecks *boundedCache[*akCertCheck]
	logs     *boundedCache[*logCheck]
}

func newVerifierCache() *verifierCache {
	return &verifierCache{
		logSeed:  maphash.MakeSeed(),
		publics:  newBoundedCache[*Public](maxCachedPublics, maxCachedPublics),
		ekPaths:  newBoundedCache[*pathCheck](maxCachedPaths, maxCachedPaths),
		akChecks: newBoundedCache[*akCertCheck](maxCachedPaths, maxCachedPaths),
		logs:     newBoundedCache[*logCheck](maxCachedLogs, maxCachedLogBytes),
	}
}

// logKey is the lookup key of an event log: a seeded 64-bit hash and the
// length. Entries found under it are compared byte for byte before use.
func (c *verifierCache) logKey(raw []byte) cacheKey {
	var k cacheKey
	binary.BigEndian.PutUint64(k[:], maphash.Bytes(c.logSeed, raw))
	binary.BigEndian.PutUint64(k[8:], uint64(len(raw)))
	copy(k[16:], "eventlog")
	return k
}
