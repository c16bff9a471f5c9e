package daemon

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/ids"
	"github.com/vtpmm/vtpmm/internal/strictjson"
)

// FuzzLoadConfig: vtpmd's YAML configuration. A file LoadConfig refuses
// is refused with ErrConfig (or a read error); a file it accepts encodes
// back to YAML that loads to the same configuration.
func FuzzLoadConfig(f *testing.F) {
	for _, p := range []string{"../../../packaging/vtpmd.yaml"} {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("host_id: host-a\ndata_dir: /var/lib/vtpmm\ntpm: swtpm:///tmp/x\n"))
	f.Add([]byte("host_id: host-a\nregistry:\n  mode: embedded\n  embedded:\n    members: [{name: host-a, peer_url: 'https://10.0.0.1:2380', client_url: 'https://10.0.0.1:2379'}]\ntls: {ca: /c, cert: /d, key: /e}\n"))
	f.Add([]byte("host_id: host-a\npeers: {host-b: '10.0.0.2:7450'}\nattestation: {evidence_max_age: 0s}\n"))
	f.Add([]byte("host_id: host-a\nunknown: 1\n"))
	f.Add([]byte(""))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(dir, "vtpmd.yaml")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		c, err := LoadConfig(path)
		if err != nil {
			if !errors.Is(err, ErrConfig) {
				t.Fatalf("refused without ErrConfig: %v", err)
			}
			return
		}
		out, err := yaml.Marshal(&c)
		if err != nil {
			t.Fatalf("an accepted configuration does not encode: %v", err)
		}
		if err := os.WriteFile(path, out, 0o600); err != nil {
			t.Fatal(err)
		}
		c2, err := LoadConfig(path)
		if err != nil {
			t.Fatalf("the re-encoded configuration is refused: %v\n%s", err, out)
		}
		if out2, _ := yaml.Marshal(&c2); !bytes.Equal(out, out2) {
			t.Fatalf("round trip changed the configuration:\n%s\n%s", out, out2)
		}
	})
}

// FuzzAdminRequests: the admin API's request bodies, decoded as the
// handlers decode them (strictjson, 1 MiB; the hook's 64 KiB and its VM
// UUID check). Whatever is accepted encodes back to a body that decodes
// to the same request; a hook request the decoder lets through names a
// VM by UUID, and a refused one is answered 400.
func FuzzAdminRequests(f *testing.F) {
	f.Add([]byte(`{"vms":["vm-a","0e2e0e2e-0000-4000-8000-000000000001"],"to":"host-b"}`))
	f.Add([]byte(`{"addr":"10.0.0.2:7450"}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"name":"vm-a","uuid":"0e2e0e2e-0000-4000-8000-000000000001"}`))
	f.Add([]byte(`{"uuid":"0e2e0e2e-0000-4000-8000-000000000001","name":"vm-a"}`))
	f.Add([]byte(`{"uuid":"../x"}`))
	types := []func() any{
		func() any { return new(adminapi.MigrateRequest) },
		func() any { return new(adminapi.EnrollRequest) },
		func() any { return new(adminapi.CreateVMRequest) },
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		for _, mk := range types {
			v := mk()
			if err := strictjson.DecodeReader(bytes.NewReader(body), v, maxAdminRequest); err != nil {
				continue
			}
			enc, err := json.Marshal(v)
			if err != nil {
				t.Fatal(err)
			}
			v2 := mk()
			if err := strictjson.DecodeReader(bytes.NewReader(enc), v2, maxAdminRequest); err != nil || !reflect.DeepEqual(v, v2) {
				t.Fatalf("%T: round trip: %v\n%+v\n%+v", v, err, v, v2)
			}
		}
		w := httptest.NewRecorder()
		r := httptest.NewRequest(http.MethodPost, adminapi.PathHookPull, bytes.NewReader(body))
		req, ok := decodeHook(w, r)
		switch {
		case ok && !ids.IsUUID(req.UUID):
			t.Fatalf("hook request without a VM UUID accepted: %+v", req)
		case !ok && w.Code != http.StatusBadRequest:
			t.Fatalf("hook request refused with %d", w.Code)
		case ok && w.Body.Len() != 0:
			t.Fatalf("accepted hook request answered: %s", w.Body)
		}
	})
}
