package attest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestCacheNeverPassesChangedInput: after a warm verification, every
// cached input changed in place (same slices, other bytes), and every
// setting a cached outcome depends on, is verified from scratch and
// refused.
func TestCacheNeverPassesChangedInput(t *testing.T) {
	h := newFakeHost(t)
	nonce := testNonce(1)
	tests := []struct {
		name   string
		mutate func(t *testing.T, ev *Evidence, v *Verifier)
		rule   Rule
	}{
		{"EK certificate byte flipped in place", func(t *testing.T, ev *Evidence, v *Verifier) {
			ev.EKCert[len(ev.EKCert)-5] ^= 1
		}, RuleEKSignature},
		{"EK public area byte flipped in place", func(t *testing.T, ev *Evidence, v *Verifier) {
			ev.EKPublic[len(ev.EKPublic)-1] ^= 1
		}, RuleEKPublic},
		{"AK public area byte flipped in place", func(t *testing.T, ev *Evidence, v *Verifier) {
			ev.AKPublic[len(ev.AKPublic)-1] ^= 1 // Y coordinate: off the curve
		}, RuleAKAttributes},
		{"event log digest byte flipped in place", func(t *testing.T, ev *Evidence, v *Verifier) {
			l, err := ParseEventLog(ev.EventLog)
			if err != nil {
				t.Fatal(err)
			}
			d := l.Events[len(l.Events)-1].Digests["sha256"]
			for i := len(ev.EventLog) - len(d); i >= 0; i-- {
				if string(ev.EventLog[i:i+len(d)]) == string(d) {
					ev.EventLog[i] ^= 0xff
					return
				}
			}
			t.Fatal("digest not found")
		}, RuleEventLogReplay},
		{"another root store", func(t *testing.T, ev *Evidence, v *Verifier) {
			v.Roots = newFakeHost(t).verifier(t).Roots
		}, RuleEKChain},
		{"validity now checked and the clock past notAfter", func(t *testing.T, ev *Evidence, v *Verifier) {
			v.Policy.EK.CheckValidity = true
			v.Policy.MaxEvidenceAge = 0
			v.Clock = func() time.Time { return testNow.Add(48 * time.Hour) }
		}, RuleEKValidity},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := h.verifier(t)
			ev := h.evidence(t, nonce)
			// The mutations write into the evidence's slices: own them.
			ev.EKCert, ev.EKPublic, ev.AKPublic, ev.EventLog = bytes.Clone(ev.EKCert), bytes.Clone(ev.EKPublic), bytes.Clone(ev.AKPublic), bytes.Clone(ev.EventLog)
			for i := 0; i < 2; i++ { // cold, then warm
				if res, err := v.Verify(context.Background(), ev, nonce); err != nil {
					t.Fatalf("%v\n%s", err, res.Explain())
				}
			}
			if v.caches().publics.len() != 3 || v.caches().ekPaths.len() != 1 || v.caches().logs.len() != 1 {
				t.Fatal("the warm verification did not fill the caches")
			}
			tt.mutate(t, ev, v)
			_, err := v.Verify(context.Background(), ev, nonce)
			wantRefusal(t, err, tt.rule)
		})
	}
}

// TestCacheStrictAfterWarm: a SHA-1 EK chain cached under the default
// policy is refused once ek.strict is set (the policy knob is part of the
// cache key).
func TestCacheStrictAfterWarm(t *testing.T) {
	h := newFakeHost(t)
	nonce := testNonce(1)
	ev := h.evidence(t, nonce)
	ev.EKCert = resignSHA1(t, ev.EKCert, h.caKey)
	v := h.verifier(t)
	if _, err := v.Verify(context.Background(), ev, nonce); err != nil {
		t.Fatal(err)
	}
	v.Policy.EK.Strict = true
	_, err := v.Verify(context.Background(), ev, nonce)
	wantRefusal(t, err, RuleEKSignature)
}

// TestVerifyConcurrent runs warm and cold verifications of several hosts
// from many goroutines on one Verifier (run with -race), including refused
// evidence, and checks every outcome.
func TestVerifyConcurrent(t *testing.T) {
	type host struct {
		h  *fakeHost
		ev *Evidence
		n  []byte
	}
	var hosts []host
	enr := &MemoryEnrollments{}
	store := NewRootStore()
	for i := 0; i < 3; i++ {
		h := newFakeHost(t)
		n := testNonce(byte(10 * i))
		hosts = append(hosts, host{h, h.evidence(t, n), n})
		e := h.enrolled(t).list[0]
		if err := enr.Add(context.Background(), e); err != nil {
			t.Fatal(err)
		}
		c, _ := ParseCertificate(h.caDER)
		store.Add(c, fmt.Sprint("host", i))
	}
	v := hosts[0].h.verifier(t)
	v.Roots, v.Enrollments = store, enr
	bad := hosts[1].h.evidence(t, hosts[1].n)
	bad.Quotes[0].Signature = hosts[2].h.sign(t, bad.Quotes[0].Attest)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				hs := hosts[(g+i)%len(hosts)]
				if _, err := v.Verify(context.Background(), hs.ev, hs.n); err != nil {
					errs <- fmt.Errorf("goroutine %d: %w", g, err)
					return
				}
				if _, err := v.Verify(context.Background(), bad, hosts[1].n); !errors.Is(err, ErrQuoteSignature) {
					errs <- fmt.Errorf("goroutine %d: bad evidence: %v", g, err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestBoundedCacheEvicts(t *testing.T) {
	c := newBoundedCache[int](3, 10)
	for i := 0; i < 5; i++ {
		c.put(keyOf("t", []byte{byte(i)}), i, 1)
	}
	if c.len() != 3 {
		t.Fatalf("%d entries, want 3", c.len())
	}
	if _, ok := c.get(keyOf("t", []byte{0})); ok {
		t.Fatal("oldest entry not evicted")
	}
	if v, ok := c.get(keyOf("t", []byte{4})); !ok || v != 4 {
		t.Fatal("newest entry missing")
	}
	c.put(keyOf("big"), 9, 11) // over the cost budget: not stored
	if _, ok := c.get(keyOf("big")); ok {
		t.Fatal("an entry over the cost budget was stored")
	}
	c.put(keyOf("heavy"), 8, 9) // evicts until the cost fits
	if c.len() != 2 || c.cost > 10 {
		t.Fatalf("%d entries, cost %d", c.len(), c.cost)
	}
	if keyOf("a", []byte("bc")) == keyOf("ab", []byte("c")) || keyOf("x", []byte("a"), []byte("b")) == keyOf("x", []byte("ab")) {
		t.Fatal("cache keys are ambiguous")
	}
}

// TestLogCacheComparesBytes: an entry found under a log's lookup key is
// used only when its stored bytes equal the log (a hash collision, forced
// here, falls back to parsing).
func TestLogCacheComparesBytes(t *testing.T) {
	h := newFakeHost(t)
	other := readFile(t, "eventlogs/ubuntu-2104-no-secure-boot.bin")
	r := &run{c: newVerifierCache()}
	fake, err := r.eventLog(other)
	if err != nil {
		t.Fatal(err)
	}
	r.c.logs.put(r.c.logKey(h.log), fake, 1) // the other log's entry under this log's key
	got, err := r.eventLog(h.log)
	if err != nil {
		t.Fatal(err)
	}
	if got == fake || !bytes.Equal(got.raw, h.log) || len(got.log.Events) != 44 {
		t.Fatal("a cached entry of other bytes was served")
	}
}
