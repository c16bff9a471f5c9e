package evacuate_test

import (
	"errors"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/evacuate"
)

func TestRecordGolden(t *testing.T) {
	b, err := os.ReadFile("testdata/record-v1.json")
	if err != nil {
		t.Fatal(err)
	}
	r, err := evacuate.DecodeRecord(b)
	if err != nil {
		t.Fatal(err)
	}
	if r.Source != "host-a" || r.State != evacuate.StateRunning || r.Holder.Session != "694d7c4a0e3f1a01" || r.Runs != 2 ||
		len(r.Plan) != 2 || r.Plan[1].Dest != "host-c" || r.Excluded[0].Rule != "pcr-policy" || r.Outcomes[0].Generation != 3 {
		t.Fatalf("decoded %+v", r)
	}
	again, err := evacuate.EncodeRecord(r)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := evacuate.DecodeRecord(again)
	if err != nil || !reflect.DeepEqual(r, r2) {
		t.Fatalf("round trip: %v", err)
	}
}

// TestRecordStrict: everything a record from the registry could get wrong
// is refused with ErrBadRecord.
func TestRecordStrict(t *testing.T) {
	good, err := os.ReadFile("testdata/record-v1.json")
	if err != nil {
		t.Fatal(err)
	}
	g := strings.TrimSpace(string(good))
	tests := map[string]string{
		"unknown field":          strings.Replace(g, `"runs":2`, `"runs":2,"force":true`, 1),
		"trailing data":          g + `{}`,
		"newer version":          strings.Replace(g, `"version":1`, `"version":2`, 1),
		"running without holder": strings.Replace(g, `"holder":{"id":"vtpmd@host-a","session":"694d7c4a0e3f1a01"},`, ``, 1),
		"unknown state":          strings.Replace(g, `"state":"running"`, `"state":"paused"`, 1),
		"malformed VM id":        strings.Replace(g, `"vm":"00000000-0000-4000-8000-000000000001"`, `"vm":"../../etc"`, 1),
		"repeated VM":            strings.Replace(g, `000000000001","name":"db-1"`, `000000000000","name":"db-1"`, 1),
		"destination is source":  strings.Replace(g, `"dest":"host-c"`, `"dest":"host-a"`, 1),
		"bad exclusion reason":   strings.Replace(g, `"reason":"refused"`, `"reason":"bored"`, 1),
		"bad outcome":            strings.Replace(g, `"outcome":"moved"`, `"outcome":"teleported"`, 1),
		"bad source":             strings.Replace(g, `"source":"host-a"`, `"source":"-x y"`, 1),
		"negative parallel":      strings.Replace(g, `"parallel":4`, `"parallel":-1`, 1),
		"not JSON":               `version: 1`,
		"too big":                `{"version":1,"source":"` + strings.Repeat("a", 1<<20) + `"}`,
	}
	for name, in := range tests {
		if in == g {
			t.Fatalf("%s: the mutation did not apply", name)
		}
		if _, err := evacuate.DecodeRecord([]byte(in)); !errors.Is(err, evacuate.ErrBadRecord) {
			t.Errorf("%s: %v, want ErrBadRecord", name, err)
		}
	}
}

func TestEncodeRefusesInvalid(t *testing.T) {
	_, err := evacuate.EncodeRecord(&evacuate.Record{Version: 1, Source: "host-a", State: evacuate.StateRunning})
	if !errors.Is(err, evacuate.ErrBadRecord) {
		t.Fatalf("%v", err)
	}
}
