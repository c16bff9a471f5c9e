package attest

import (
	cryptorand "crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"sync"
	"time"
)

// NewNonce returns MaxNonceSize random bytes from rand (crypto/rand when nil).
func NewNonce(rand io.Reader) ([]byte, error) {
	if rand == nil {
		rand = cryptorand.Reader
	}
	n := make([]byte, MaxNonceSize)
	if _, err := io.ReadFull(rand, n); err != nil {
		return nil, fmt.Errorf("nonce: %w", err)
	}
	return n, nil
}

// NonceConsumer accepts a nonce once: Consume fails for a nonce that was
// never issued, has expired, or was already consumed.
type NonceConsumer interface {
	Consume(nonce []byte) error
}

// NonceBook issues single-use nonces that expire after TTL. It is safe for
// concurrent use. Expired entries are dropped on each Issue.
type NonceBook struct {
	TTL   time.Duration
	Clock func() time.Time
	Rand  io.Reader

	mu     sync.Mutex
	issued map[string]time.Time
}

// Issue returns a fresh nonce and remembers it.
func (b *NonceBook) Issue() ([]byte, error) {
	n, err := NewNonce(b.Rand)
	if err != nil {
		return nil, err
	}
	now := b.Clock()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.issued == nil {
		b.issued = map[string]time.Time{}
	}
	for k, t := range b.issued {
		if now.Sub(t) > b.TTL {
			delete(b.issued, k)
		}
	}
	b.issued[hex.EncodeToString(n)] = now
	return n, nil
}

// Consume implements NonceConsumer.
func (b *NonceBook) Consume(nonce []byte) error {
	k := hex.EncodeToString(nonce)
	b.mu.Lock()
	defer b.mu.Unlock()
	t, ok := b.issued[k]
	if !ok {
		return refuse(RuleNonce, "nonce %s was not issued by this verifier or was already used", short(nonce))
	}
	delete(b.issued, k)
	if age := b.Clock().Sub(t); age > b.TTL {
		return refuse(RuleNonce, "nonce %s expired (issued %s ago, TTL %s)", short(nonce), age.Round(time.Second), b.TTL)
	}
	return nil
}
