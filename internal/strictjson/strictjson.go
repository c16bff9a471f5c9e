// Package strictjson owns the one strict JSON decoder for untrusted input
// (protocol messages, envelopes, the vault file, admin requests): the input
// is size-limited, unknown fields are refused, and nothing may follow the
// one value. Callers wrap its errors with their own sentinel (for example
// migrate.ErrBadMessage or vtpm.ErrCorrupt). It imports nothing of vtpmm.
package strictjson

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Errors of Decode besides encoding/json's own.
var (
	// ErrTooLarge means the input exceeds the limit.
	ErrTooLarge = errors.New("input too large")
	// ErrTrailingData means something follows the JSON value.
	ErrTrailingData = errors.New("trailing data after the JSON value")
)

// Decode decodes exactly one JSON value from b into v: at most max bytes
// (max <= 0: no limit), no unknown fields, no trailing data.
func Decode(b []byte, v any, max int) error {
	if max > 0 && len(b) > max {
		return fmt.Errorf("%w: %d bytes (limit %d)", ErrTooLarge, len(b), max)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return ErrTrailingData
	}
	return nil
}

// DecodeReader reads at most max bytes from r and decodes them as Decode
// does; more than max bytes is ErrTooLarge.
func DecodeReader(r io.Reader, v any, max int) error {
	b, err := io.ReadAll(io.LimitReader(r, int64(max)+1))
	if err != nil {
		return err
	}
	return Decode(b, v, max)
}
