package wire

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/vtpmm/vtpmm/migrate"
)

// FuzzCodec: the agent wire's codec on both sides. On the server it hands
// the request's bytes unchanged to the strict decoders (and keeps its own
// copy: gRPC recycles the buffer); on the client it decodes a peer's
// response, which is untrusted: every response type either refuses the
// bytes or holds a value that encodes and decodes to itself.
func FuzzCodec(f *testing.F) {
	f.Add([]byte(`{"evidence":{"format":"vtpmm-evidence","version":1}}`))
	f.Add([]byte(`{"tx":"00112233445566778899aabbccddeeff","accepted":["0e2e0e2e-0000-4000-8000-000000000001"],"proofs":{"0e2e0e2e-0000-4000-8000-000000000001":"AAEC"}}`))
	f.Add([]byte(`{"tx":"00112233445566778899aabbccddeeff","state":"dst-committed","committed":["0e2e0e2e-0000-4000-8000-000000000001"]}`))
	f.Add([]byte(`{"tx":"00112233445566778899aabbccddeeff","known":true,"state":"src-prepared","running":["a"],"held":{"a":3}}`))
	f.Add([]byte(`{"host":"host-b","ek_cert":"MAA=","ek_intermediates":["MAA="],"ek_public":"AAE=","ak_public":"AAE="}`))
	f.Add([]byte(`{"tx":"00112233445566778899aabbccddeeff","owner":"host-a","vms":["a"],"warm":true}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`{"tx":1}`))
	c := jsonCodec{}
	responses := []func() any{
		func() any { return new(migrate.EvidenceResponse) },
		func() any { return new(migrate.PrepareResponse) },
		func() any { return new(migrate.FinishResponse) },
		func() any { return new(migrate.StatusResponse) },
		func() any { return new(migrate.IdentityResponse) },
		func() any { return new(migrate.ActivateResponse) },
		func() any { return new(migrate.PullResponse) },
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var raw rawMessage
		in := append([]byte(nil), b...)
		if err := c.Unmarshal(in, &raw); err != nil || !bytes.Equal(raw, b) {
			t.Fatalf("server side: %v, %q for %q", err, raw, b)
		}
		if len(in) > 0 {
			in[0] ^= 0xff // gRPC reuses its buffer
			if !bytes.Equal(raw, b) {
				t.Fatal("the server's request aliases the receive buffer")
			}
		}
		if out, err := c.Marshal(raw); err != nil || !bytes.Equal(out, b) {
			t.Fatalf("raw message re-sent as %q (%v)", out, err)
		}
		for _, mk := range responses {
			v := mk()
			if err := c.Unmarshal(b, v); err != nil {
				continue
			}
			enc, err := c.Marshal(v)
			if err != nil {
				t.Fatalf("%T decoded but does not encode: %v", v, err)
			}
			v2 := mk()
			if err := c.Unmarshal(enc, v2); err != nil {
				t.Fatalf("%T: re-encoded response refused: %v (%s)", v, err, enc)
			}
			enc2, _ := c.Marshal(v2)
			if !bytes.Equal(enc, enc2) {
				t.Fatalf("%T: round trip changed the response:\n%s\n%s", v, enc, enc2)
			}
			if er, ok := v2.(*migrate.EvidenceResponse); ok && len(er.Evidence) > 0 && !json.Valid(er.Evidence) {
				t.Fatalf("evidence is not JSON: %q", er.Evidence)
			}
		}
	})
}
