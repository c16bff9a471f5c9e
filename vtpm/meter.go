package vtpm

import (
	"encoding/binary"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// CommandClass groups TPM commands by what they cost on real hardware.
type CommandClass int

// Command classes, from cheapest to most expensive.
const (
	// ClassHandle covers handle, hash and symmetric commands (Load, Unseal,
	// PCR_Read, PolicyPCR, FlushContext, StartAuthSession, NV_Read, ...).
	ClassHandle CommandClass = iota
	// ClassAsym covers one private-key operation (Quote, Certify, ECDH_ZGen,
	// Import, ActivateCredential, Sign, RSA_Decrypt).
	ClassAsym
	// ClassKeyGen covers key creation (CreatePrimary, Create, CreateLoaded).
	ClassKeyGen
)

func (c CommandClass) String() string {
	switch c {
	case ClassAsym:
		return "asym"
	case ClassKeyGen:
		return "keygen"
	default:
		return "handle"
	}
}

// ClassOf returns the cost class of a command code.
func ClassOf(cc tpm2.TPMCC) CommandClass {
	switch cc {
	case tpm2.TPMCCQuote, tpm2.TPMCCCertify, tpm2.TPMCCCertifyCreation, tpm2.TPMCCECDHZGen,
		tpm2.TPMCCECDHKeyGen, tpm2.TPMCCImport, tpm2.TPMCCActivateCredential, tpm2.TPMCCSign,
		tpm2.TPMCCRSADecrypt, tpm2.TPMCCRSAEncrypt, tpm2.TPMCCNVCertify, tpm2.TPMCCGetTime:
		return ClassAsym
	case tpm2.TPMCCCreatePrimary, tpm2.TPMCCCreate, tpm2.TPMCCCreateLoaded:
		return ClassKeyGen
	}
	return ClassHandle
}

// Profile is a latency profile: the time one command of each class takes.
type Profile struct {
	Name   string
	Handle time.Duration
	Asym   time.Duration
	KeyGen time.Duration
}

// Latency returns the injected latency of one command.
func (p Profile) Latency(cc tpm2.TPMCC) time.Duration {
	switch ClassOf(cc) {
	case ClassAsym:
		return p.Asym
	case ClassKeyGen:
		return p.KeyGen
	}
	return p.Handle
}

// Latency profiles. The numbers are typical (p50) published latencies; see
// docs/performance.md for the sources. KeyGen assumes ECC P-256: vtpmm
// never generates RSA keys on a request path.
var (
	ProfileNone = Profile{Name: "none"}
	ProfileFTPM = Profile{Name: "ftpm", Handle: 5 * time.Millisecond, Asym: 30 * time.Millisecond, KeyGen: 60 * time.Millisecond}
	ProfileDTPM = Profile{Name: "dtpm", Handle: 50 * time.Millisecond, Asym: 200 * time.Millisecond, KeyGen: 300 * time.Millisecond}
)

// ProfileByName returns the profile called none, ftpm or dtpm.
func ProfileByName(name string) (Profile, error) {
	for _, p := range []Profile{ProfileNone, ProfileFTPM, ProfileDTPM} {
		if p.Name == name {
			return p, nil
		}
	}
	return Profile{}, fmt.Errorf("latency profile %q: %w", name, ErrBadURI)
}

// Meter is a transport decorator that counts commands by command code and
// injects latency by command class. It is safe for concurrent use; the
// TPM underneath still runs one command at a time.
type Meter struct {
	next    transport.TPM
	profile Profile
	sleep   func(time.Duration)

	mu       sync.Mutex
	counts   map[tpm2.TPMCC]int
	injected time.Duration
}

var _ transport.TPMCloser = (*Meter)(nil)

// MeterOption configures a Meter.
type MeterOption func(*Meter)

// WithSleep replaces the function that injects latency. Pass a no-op to
// account the modelled TPM time without waiting for it.
func WithSleep(f func(time.Duration)) MeterOption { return func(m *Meter) { m.sleep = f } }

// NewMeter wraps a transport.
func NewMeter(next transport.TPM, p Profile, opts ...MeterOption) *Meter {
	m := &Meter{next: next, profile: p, sleep: time.Sleep, counts: map[tpm2.TPMCC]int{}}
	for _, o := range opts {
		o(m)
	}
	return m
}

// Send implements transport.TPM.
func (m *Meter) Send(cmd []byte) ([]byte, error) {
	var cc tpm2.TPMCC
	if len(cmd) >= 10 {
		cc = tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:10]))
	}
	d := m.profile.Latency(cc)
	m.mu.Lock()
	m.counts[cc]++
	m.injected += d
	m.mu.Unlock()
	if d > 0 {
		m.sleep(d)
	}
	return m.next.Send(cmd)
}

// Close closes the wrapped transport when it can be closed.
func (m *Meter) Close() error {
	if c, ok := m.next.(transport.TPMCloser); ok {
		return c.Close()
	}
	return nil
}

// Stats is a snapshot of a Meter.
type Stats struct {
	ByCode   map[tpm2.TPMCC]int
	Total    int
	Injected time.Duration // modelled TPM time under the profile
}

// Stats returns the counts since creation or the last Reset.
func (m *Meter) Stats() Stats {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := Stats{ByCode: make(map[tpm2.TPMCC]int, len(m.counts)), Injected: m.injected}
	for k, v := range m.counts {
		s.ByCode[k] = v
		s.Total += v
	}
	return s
}

// Reset zeroes the counters.
func (m *Meter) Reset() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.counts = map[tpm2.TPMCC]int{}
	m.injected = 0
}

// Sub returns the difference s - prev, for measuring one operation.
func (s Stats) Sub(prev Stats) Stats {
	out := Stats{ByCode: map[tpm2.TPMCC]int{}, Injected: s.Injected - prev.Injected}
	for k, v := range s.ByCode {
		if d := v - prev.ByCode[k]; d != 0 {
			out.ByCode[k] = d
			out.Total += d
		}
	}
	return out
}

// String renders the counts as "Load=1 Unseal=1 ...", sorted by name.
func (s Stats) String() string {
	parts := make([]string, 0, len(s.ByCode))
	for k, v := range s.ByCode {
		parts = append(parts, fmt.Sprintf("%s=%d", CommandName(k), v))
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}
