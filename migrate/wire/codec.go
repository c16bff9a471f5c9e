package wire

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"

	"github.com/vtpmm/vtpmm/migrate"
)

// codecName is the codec's name; with ForceCodec the client sends it as
// the content-subtype ("application/grpc+json").
const codecName = "json"

// rawMessage is what the server's handlers decode a request into: the
// bytes as received, so that every request goes through a strict decoder
// (migrate.DecodePrepare, migrate.DecodeFinish, decodeStrict).
type rawMessage []byte

// jsonCodec is the agent wire's codec. It is passed per server
// (grpc.ForceServerCodec) and per connection (grpc.ForceCodec); it is never
// registered globally.
type jsonCodec struct{}

func (jsonCodec) Name() string { return codecName }

func (jsonCodec) Marshal(v any) ([]byte, error) {
	switch m := v.(type) {
	case rawMessage:
		return m, nil
	case *rawMessage:
		return *m, nil
	}
	return json.Marshal(v)
}

// Unmarshal copies the bytes for a *rawMessage (the server side; the
// buffer is recycled after the call) and decodes anything else (the
// client side, responses) with encoding/json. gRPC has already bounded
// the size (MaxMessageSize).
func (jsonCodec) Unmarshal(data []byte, v any) error {
	if r, ok := v.(*rawMessage); ok {
		*r = append((*r)[:0], data...)
		return nil
	}
	if len(data) > MaxMessageSize {
		return fmt.Errorf("wire: response of %d bytes (limit %d)", len(data), MaxMessageSize)
	}
	return json.Unmarshal(data, v)
}

// decodeStrict decodes one request that has no strict decoder in package
// migrate (Evidence, Status): size-limited, no unknown fields, no trailing
// data. Errors wrap migrate.ErrBadMessage.
func decodeStrict[T any](what string, b []byte) (*T, error) {
	if len(b) > MaxMessageSize {
		return nil, fmt.Errorf("decode %s: %w: %d bytes (limit %d)", what, migrate.ErrBadMessage, len(b), MaxMessageSize)
	}
	var v T
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("decode %s: %w: %v", what, migrate.ErrBadMessage, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("decode %s: %w: trailing data after the message", what, migrate.ErrBadMessage)
	}
	return &v, nil
}
