package vtpm

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
)

// Opener opens a TPM for a URI scheme that this package does not know on its
// own, for example the in-process simulator (see package vtpm/tpmsim).
type Opener func(ctx context.Context, u *url.URL) (transport.TPMCloser, error)

// OpenOption configures Open.
type OpenOption func(*openConfig)

type openConfig struct {
	openers map[string]Opener
	dialer  net.Dialer
}

// WithOpener registers an Opener for one URI scheme.
func WithOpener(scheme string, o Opener) OpenOption {
	return func(c *openConfig) { c.openers[scheme] = o }
}

// Open opens a host TPM by URI:
//
//	device:///dev/tpmrm0        the kernel resource manager (production)
//	swtpm+tcp://127.0.0.1:2321  swtpm's raw TPM command port (socket mode)
//	swtpm+unix:///run/x.sock    swtpm's unix-socket command channel
//
// Further schemes (simulator://) are added with WithOpener. The returned
// transport serialises commands: a TPM runs one command at a time.
func Open(ctx context.Context, uri string, opts ...OpenOption) (transport.TPMCloser, error) {
	cfg := openConfig{openers: map[string]Opener{}}
	for _, o := range opts {
		o(&cfg)
	}
	u, err := url.Parse(uri)
	if err != nil {
		return nil, fmt.Errorf("open TPM %q: %w: %v", uri, ErrBadURI, err)
	}
	switch u.Scheme {
	case "device":
		if u.Path == "" {
			return nil, fmt.Errorf("open TPM %q: %w: device URI needs a path, e.g. device:///dev/tpmrm0", uri, ErrBadURI)
		}
		t, err := linuxtpm.Open(u.Path)
		if err != nil {
			return nil, fmt.Errorf("open TPM %q: %w: %v", uri, ErrTPMUnavailable, err)
		}
		return &lockedTPM{tpm: t}, nil // the kernel driver retries TPM_RC_RETRY itself
	case "swtpm+tcp":
		if u.Host == "" {
			return nil, fmt.Errorf("open TPM %q: %w: swtpm+tcp URI needs host:port", uri, ErrBadURI)
		}
		c, err := cfg.dialer.DialContext(ctx, "tcp", u.Host)
		if err != nil {
			return nil, fmt.Errorf("open TPM %q: %w: %v", uri, ErrTPMUnavailable, err)
		}
		return NewStreamTPM(c), nil
	case "swtpm+unix":
		p := u.Path
		if p == "" {
			p = u.Opaque
		}
		if p == "" {
			return nil, fmt.Errorf("open TPM %q: %w: swtpm+unix URI needs a socket path", uri, ErrBadURI)
		}
		c, err := cfg.dialer.DialContext(ctx, "unix", p)
		if err != nil {
			return nil, fmt.Errorf("open TPM %q: %w: %v", uri, ErrTPMUnavailable, err)
		}
		return NewStreamTPM(c), nil
	}
	if o, ok := cfg.openers[u.Scheme]; ok {
		t, err := o(ctx, u)
		if err != nil {
			return nil, fmt.Errorf("open TPM %q: %w: %v", uri, ErrTPMUnavailable, err)
		}
		return t, nil
	}
	known := []string{"device", "swtpm+tcp", "swtpm+unix"}
	for s := range cfg.openers {
		known = append(known, s)
	}
	return nil, fmt.Errorf("open TPM %q: %w: scheme %q (known: %s)", uri, ErrBadURI, u.Scheme, strings.Join(known, ", "))
}

// maxResponse bounds a TPM response; TPM2 responses are far smaller.
const maxResponse = 1 << 16

// streamTPM speaks raw TPM 2.0 commands over a stream (swtpm's data
// channel). It reads whole responses by their header length, since a
// stream may split a response across reads.
type streamTPM struct {
	mu   sync.Mutex
	conn io.ReadWriteCloser
}

// NewStreamTPM wraps a connected stream that carries raw TPM commands.
func NewStreamTPM(c io.ReadWriteCloser) transport.TPMCloser { return &streamTPM{conn: c} }

// Send sends one command. Responses TPM_RC_RETRY, TPM_RC_YIELDED and
// TPM_RC_TESTING mean the TPM did not start the command; it is resent
// unchanged, as the kernel's TPM driver does for /dev/tpmrm0. libtpms
// answers TPM_RC_RETRY, for example, to the first authorization failure
// after a start, while it records the dictionary-attack state.
func (s *streamTPM) Send(cmd []byte) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for attempt := 0; ; attempt++ {
		rsp, err := s.roundTrip(cmd)
		if err != nil || attempt >= maxRetries || !isRetryRC(rsp) {
			return rsp, err
		}
		time.Sleep(time.Duration(attempt+1) * time.Millisecond)
	}
}

const maxRetries = 20

func isRetryRC(rsp []byte) bool {
	if len(rsp) < 10 {
		return false
	}
	switch binary.BigEndian.Uint32(rsp[6:10]) {
	case uint32(tpm2.TPMRCRetry), uint32(tpm2.TPMRCYielded), uint32(tpm2.TPMRCTesting):
		return true
	}
	return false
}

// CommandTimeout bounds one command on a stream transport, so a TPM that
// never answers (or a socket another client holds: swtpm serves one
// connection at a time) fails instead of hanging. RSA key generation on a
// discrete TPM can take 20 s; nothing vtpmm runs takes longer.
const CommandTimeout = 2 * time.Minute

func (s *streamTPM) roundTrip(cmd []byte) ([]byte, error) {
	if d, ok := s.conn.(interface{ SetDeadline(time.Time) error }); ok {
		_ = d.SetDeadline(time.Now().Add(CommandTimeout))
	}
	if _, err := s.conn.Write(cmd); err != nil {
		return nil, fmt.Errorf("send TPM command: %w: %v", ErrTPMUnavailable, err)
	}
	var hdr [10]byte
	if _, err := io.ReadFull(s.conn, hdr[:]); err != nil {
		return nil, fmt.Errorf("read TPM response: %w: %v", ErrTPMUnavailable, err)
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < 10 || size > maxResponse {
		return nil, fmt.Errorf("read TPM response: %w: size %d", ErrTPMResponse, size)
	}
	rsp := make([]byte, size)
	copy(rsp, hdr[:])
	if _, err := io.ReadFull(s.conn, rsp[10:]); err != nil {
		return nil, fmt.Errorf("read TPM response: %w: %v", ErrTPMUnavailable, err)
	}
	return rsp, nil
}

func (s *streamTPM) Close() error { return s.conn.Close() }

// lockedTPM serialises Send on a transport that is not safe for concurrent use.
type lockedTPM struct {
	mu  sync.Mutex
	tpm transport.TPMCloser
}

func (l *lockedTPM) Send(cmd []byte) ([]byte, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.tpm.Send(cmd)
}

func (l *lockedTPM) Close() error { return l.tpm.Close() }
