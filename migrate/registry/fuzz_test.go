package registry_test

import (
	"encoding/json"
	"errors"
	"os"
	"reflect"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/registry"
)

// Every decoder of registry records is fed bytes from etcd, which any
// host with registry access can write: each refuses with ErrBadRecord, and
// what it accepts encodes back to a record it accepts again.

func fuzzRoundTrip[T any](f *testing.F, seeds []string, decode func([]byte) (T, error)) {
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	f.Add([]byte(`{}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`{"v":1} {}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := decode(b)
		if err != nil {
			if !errors.Is(err, registry.ErrBadRecord) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		again, err := json.Marshal(&v)
		if err != nil {
			t.Fatal(err)
		}
		v2, err := decode(again)
		if err != nil {
			t.Fatalf("re-encoded record refused: %v (%s)", err, again)
		}
		if !reflect.DeepEqual(v, v2) {
			t.Fatalf("round trip changed the record: %+v vs %+v", v, v2)
		}
	})
}

func seed(f *testing.F, name string) string {
	b, err := os.ReadFile("testdata/" + name)
	if err != nil {
		f.Fatal(err)
	}
	return string(b)
}

func FuzzDecodeVM(f *testing.F) {
	fuzzRoundTrip(f, []string{seed(f, "vm-open.json"),
		`{"v":1,"vm":"vm-1","owner":"host-a","generation":1}`,
		`{"v":1,"vm":"vm-1","owner":"host-a","generation":9007199254740992}`,
		`{"generation":1,"v":1,"vm":"vm-1","owner":"host-a"}`,
	}, registry.DecodeVM)
}

func FuzzDecodeHost(f *testing.F) {
	fuzzRoundTrip(f, []string{`{"v":1,"name":"host-a","addr":"10.0.0.1:7443","identity":{"ek":"00ff","ak":"aa00","mk":"0102"}}`}, registry.DecodeHost)
}

func FuzzDecodeEnrolment(f *testing.F) {
	fuzzRoundTrip(f, []string{`{"v":1,"host":"host-a","identity":{"ek":"00ff","ak":"aa00"},"by":"root","at":"2026-12-06T10:00:00Z"}`,
		`{"v":1,"host":"host-a","identity":{"ek":"00ff","ak":"aa00"},"by":"root","at":"2026-12-07T10:00:00Z","replaced":[{"identity":{"ek":"11ff","ak":"bb00","mk":"cc"},"at":"2026-12-06T10:00:00Z","replaced_at":"2026-12-07T09:59:00Z","by":"root"}]}`,
	}, registry.DecodeEnrolment)
}

func FuzzDecodeStandby(f *testing.F) {
	fuzzRoundTrip(f, []string{`{"v":1,"vm":"vm-1","host":"host-b","generation":3,"updated":"2026-12-06T10:00:00Z"}`}, registry.DecodeStandby)
}

func FuzzDecodePlan(f *testing.F) {
	fuzzRoundTrip(f, []string{`{"v":1,"source":"host-a","state":"running","items":[{"vm":"vm-1","dest":"host-b","state":"moved","generation":2}],"created":"2026-12-06T10:00:00Z","updated":"2026-12-06T10:00:00Z"}`}, registry.DecodePlan)
}

func FuzzDecodeState(f *testing.F) {
	f.Add([]byte(registry.StateValueForTest(registry.StateFenced)))
	f.Add([]byte(`{"v":1,"state":"active"}`))
	f.Add([]byte(`{"v":1,"state":"Active"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := registry.DecodeStateForTest(b)
		if err != nil {
			if !errors.Is(err, registry.ErrBadRecord) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		// Accepted means canonical: CAS compares these bytes.
		if string(b) != registry.StateValueForTest(s) {
			t.Fatalf("accepted a non-canonical state %q", b)
		}
	})
}

func FuzzDecodeCache(f *testing.F) {
	f.Add([]byte(`{"v":1,"rev":12,"vms":[{"rev":10,"vm":` + seed(f, "vm-open.json") + `}]}`))
	f.Add([]byte(`{"v":1,"rev":0,"vms":[]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		rev, vms, revs, err := registry.DecodeCache(b)
		if err != nil {
			if !errors.Is(err, registry.ErrBadRecord) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		for i := range vms {
			if revs[i] <= 0 || revs[i] > rev {
				t.Fatalf("accepted VM revision %d in a view at %d", revs[i], rev)
			}
		}
	})
}

// TestRecordDecoding: what the decoders refuse (each with ErrBadRecord),
// and the canonical form every VM record must have.
func TestRecordDecoding(t *testing.T) {
	open, err := os.ReadFile("testdata/vm-open.json")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := registry.DecodeVM(open); err != nil {
		t.Fatalf("golden record: %v", err)
	}
	bad := []struct{ name, in string }{
		{"unknown field", `{"v":1,"vm":"vm-1","owner":"host-a","generation":1,"x":1}`},
		{"other version", `{"v":2,"vm":"vm-1","owner":"host-a","generation":1}`},
		{"generation zero", `{"v":1,"vm":"vm-1","owner":"host-a","generation":0}`},
		{"generation above the bound", `{"v":1,"vm":"vm-1","owner":"host-a","generation":9007199254740992}`},
		{"generation 2^64", `{"v":1,"vm":"vm-1","owner":"host-a","generation":18446744073709551616}`},
		{"negative generation", `{"v":1,"vm":"vm-1","owner":"host-a","generation":-1}`},
		{"owner with a slash", `{"v":1,"vm":"vm-1","owner":"host/a","generation":1}`},
		{"VM ID with a slash", `{"v":1,"vm":"a/b","owner":"host-a","generation":1}`},
		{"not canonical (field order)", `{"vm":"vm-1","v":1,"owner":"host-a","generation":1}`},
		{"not canonical (space)", `{"v":1, "vm":"vm-1","owner":"host-a","generation":1}`},
		{"duplicate field", `{"v":1,"vm":"vm-1","owner":"host-b","owner":"host-a","generation":1}`},
		{"trailing data", `{"v":1,"vm":"vm-1","owner":"host-a","generation":1}{}`},
		{"empty transaction", `{"v":1,"vm":"vm-1","owner":"host-a","generation":1,"tx":{"id":"","to":"host-b"}}`},
		{"too large", `{"v":1,"vm":"` + string(make([]byte, registry.MaxRecordBytes)) + `"}`},
	}
	for _, tt := range bad {
		if _, err := registry.DecodeVM([]byte(tt.in)); !errors.Is(err, registry.ErrBadRecord) {
			t.Errorf("%s: %v", tt.name, err)
		}
	}
	badHosts := []string{
		`{"v":1,"name":"host-a","addr":"","identity":{"ek":"00","ak":"00"}}`,
		`{"v":1,"name":"host-a","addr":"x:1","identity":{"ek":"0","ak":"00"}}`,
		`{"v":1,"name":"host-a","addr":"x:1","identity":{"ek":"00","ak":"GG"}}`,
		`{"v":1,"name":"host-a","addr":"x:1","identity":{"ek":"00"}}`,
	}
	for _, in := range badHosts {
		if _, err := registry.DecodeHost([]byte(in)); !errors.Is(err, registry.ErrBadRecord) {
			t.Errorf("host %s: %v", in, err)
		}
	}
	const id = `"identity":{"ek":"00","ak":"00"}`
	goodEnrol := []string{
		`{"v":1,"host":"host-a",` + id + `,"at":"2026-01-02T03:04:05Z"}`,
		`{"v":1,"host":"host-a",` + id + `,"at":"2026-01-02T03:04:05Z","method":"activation"}`,
		`{"v":1,"host":"host-a",` + id + `,"at":"2026-01-02T03:04:05Z","method":"ak-certificate","ak_cert":"abcd"}`,
		`{"v":1,"host":"host-a",` + id + `,"at":"2026-01-02T03:04:05Z","replaced":[{"identity":{"ek":"01","ak":"01"},"at":"2026-01-01T03:04:05Z","replaced_at":"2026-01-02T03:04:05Z"}]}`,
	}
	for _, in := range goodEnrol {
		if _, err := registry.DecodeEnrolment([]byte(in)); err != nil {
			t.Errorf("enrolment %s: %v", in, err)
		}
	}
	badEnrol := []string{
		`{"v":1,"host":"host-a",` + id + `,"at":"2026-01-02T03:04:05Z","method":"trust-me"}`,
		`{"v":1,"host":"host-a",` + id + `,"at":"2026-01-02T03:04:05Z","method":"ak-certificate"}`,
		`{"v":1,"host":"host-a",` + id + `,"at":"2026-01-02T03:04:05Z","ak_cert":"abcd"}`,
		`{"v":1,"host":"host-a",` + id + `,"at":"2026-01-02T03:04:05Z","method":"ak-certificate","ak_cert":"XY"}`,
		// a replaced identity: without replaced_at, the enrolled one itself, malformed, unknown fields
		`{"v":1,"host":"host-a",` + id + `,"at":"2026-01-02T03:04:05Z","replaced":[{"identity":{"ek":"01","ak":"01"},"at":"2026-01-01T03:04:05Z"}]}`,
		`{"v":1,"host":"host-a",` + id + `,"at":"2026-01-02T03:04:05Z","replaced":[{"identity":{"ek":"00","ak":"01"},"at":"2026-01-01T03:04:05Z","replaced_at":"2026-01-02T03:04:05Z"}]}`,
		`{"v":1,"host":"host-a",` + id + `,"at":"2026-01-02T03:04:05Z","replaced":[{"identity":{"ek":"01","ak":"00"},"at":"2026-01-01T03:04:05Z","replaced_at":"2026-01-02T03:04:05Z"}]}`,
		`{"v":1,"host":"host-a",` + id + `,"at":"2026-01-02T03:04:05Z","replaced":[{"identity":{"ek":"0","ak":"01"},"at":"2026-01-01T03:04:05Z","replaced_at":"2026-01-02T03:04:05Z"}]}`,
		`{"v":1,"host":"host-a",` + id + `,"at":"2026-01-02T03:04:05Z","replaced":[{"identity":{"ek":"01","ak":"01"},"at":"2026-01-01T03:04:05Z","replaced_at":"2026-01-02T03:04:05Z","why":"x"}]}`,
		`{"v":1,"host":"host-a",` + id + `,"at":"2026-01-02T03:04:05Z","replaced":[{"identity":{"ek":"01","ak":"01"},"at":"2026-01-01T03:04:05Z","replaced_at":"2026-01-02T03:04:05Z","by":"-bad-"}]}`,
	}
	for _, in := range badEnrol {
		if _, err := registry.DecodeEnrolment([]byte(in)); !errors.Is(err, registry.ErrBadRecord) {
			t.Errorf("enrolment %s: %v", in, err)
		}
	}
}
