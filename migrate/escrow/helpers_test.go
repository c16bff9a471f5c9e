package escrow

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/vtpmm/vtpmm/vtpm"
)

const testVM = "0e2e0e2e-0000-4000-8000-00000000d3e0"

var testNow = time.Date(2026, 12, 6, 18, 12, 0, 123456789, time.UTC)

// custodianKeys is one custodian's identity and recipient strings.
type custodianKeys struct {
	name      string
	identity  string // AGE-SECRET-KEY-…
	recipient string // age1…
}

// newCustodians makes n custodians with fresh X25519 or hybrid keys.
func newCustodians(t testing.TB, n int, pq bool) []custodianKeys {
	t.Helper()
	out := make([]custodianKeys, n)
	for i := range out {
		out[i].name = fmt.Sprintf("custodian-%d", i+1)
		if pq {
			id, err := age.GenerateHybridIdentity()
			if err != nil {
				t.Fatal(err)
			}
			out[i].identity, out[i].recipient = id.String(), id.Recipient().String()
		} else {
			id, err := age.GenerateX25519Identity()
			if err != nil {
				t.Fatal(err)
			}
			out[i].identity, out[i].recipient = id.String(), id.Recipient().String()
		}
	}
	return out
}

func policyFor(t testing.TB, k int, cs []custodianKeys) *Policy {
	t.Helper()
	cfg := Config{Threshold: k}
	for _, c := range cs {
		cfg.Custodians = append(cfg.Custodians, CustodianConfig{Name: c.name, Recipients: []string{c.recipient}})
	}
	p, err := cfg.Policy(nil)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func identitiesOf(t testing.TB, cs ...custodianKeys) []*Identity {
	t.Helper()
	var out []*Identity
	for _, c := range cs {
		id, err := ParseIdentity(c.identity, c.name+".key", nil)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, id)
	}
	return out
}

// knownKey is a VM key whose bytes the test knows (for G1 scans).
func knownKey(t testing.TB) (vtpm.VMKey, []byte) {
	t.Helper()
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		t.Fatal(err)
	}
	k, err := vtpm.NewVMKey(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	return k, raw
}

func testContents(state []byte) Contents {
	return Contents{VM: VM{UUID: testVM, Name: "vm42"}, Generation: 7, SourceHost: "host-a",
		VaultKeyID: "af1eff80674fea70", State: state}
}

// testState is a stand-in for an encrypted swtpm state blob.
func testState(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// recordingReader passes crypto/rand through and keeps what it handed
// out, so a test knows the bundle ID and bundle key (the first 48 bytes).
type recordingReader struct {
	mu  sync.Mutex
	got []byte
}

func (r *recordingReader) Read(p []byte) (int, error) {
	n, err := rand.Read(p)
	r.mu.Lock()
	r.got = append(r.got, p[:n]...)
	r.mu.Unlock()
	return n, err
}

func seal(t testing.TB, p *Policy, c Contents, k vtpm.VMKey) []byte {
	t.Helper()
	s, err := NewSealer(p, SealerOptions{Now: func() time.Time { return testNow }})
	if err != nil {
		t.Fatal(err)
	}
	b, err := s.Seal(context.Background(), c, k)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// frame is a decoded bundle a test can change and re-encode.
type frame struct {
	h      Header
	shares [][]byte
	nonce  []byte
	ct     []byte
	state  []byte
}

// reframe decodes a bundle, lets mutate change it, and re-encodes the
// header canonically: a forgery that passes the structural check.
func reframe(t testing.TB, b []byte, mutate func(f *frame)) []byte {
	t.Helper()
	d, err := decodeBundle(b)
	if err != nil {
		t.Fatal(err)
	}
	f := &frame{h: d.hdr, nonce: d.nonce, ct: d.ct, state: bytes.Clone(d.state)}
	f.h.Custodians = append([]CustodianShare(nil), d.hdr.Custodians...)
	for _, s := range d.shares {
		f.shares = append(f.shares, bytes.Clone(s))
	}
	mutate(f)
	hdr, err := encodeHeader(&f.h)
	if err != nil {
		t.Fatal(err)
	}
	out := framePrefix(hdr)
	for _, s := range f.shares {
		out = binary.BigEndian.AppendUint32(out, uint32(len(s)))
		out = append(out, s...)
	}
	out = append(out, f.nonce...)
	out = append(out, f.ct...)
	out = binary.BigEndian.AppendUint64(out, uint64(len(f.state)))
	return append(out, f.state...)
}

var _ io.Reader = (*recordingReader)(nil)

func vtpmZeroKey() vtpm.VMKey { return vtpm.VMKey{} }
