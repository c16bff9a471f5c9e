package wire

import (
	"encoding/json"
	"fmt"
)

// codecName is the codec's name; with ForceCodec the client sends it as
// the content-subtype ("application/grpc+json").
const codecName = "json"

// rawMessage is what the server's handlers decode a request into: the
// bytes as received, so that every request goes through a strict decoder
// (migrate.DecodePrepare, migrate.DecodeFinish, migrate.DecodeStrict).
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
