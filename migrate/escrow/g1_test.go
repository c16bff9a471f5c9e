package escrow

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/vtpmm/vtpmm/vtpm"
)

// forms are the encodings a leaked key would take.
func forms(name string, raw []byte) map[string][]byte {
	return map[string][]byte{
		name + " raw":            raw,
		name + " hex":            []byte(hex.EncodeToString(raw)),
		name + " HEX":            []byte(strings.ToUpper(hex.EncodeToString(raw))),
		name + " base64":         []byte(base64.StdEncoding.EncodeToString(raw)),
		name + " base64 raw":     []byte(base64.RawStdEncoding.EncodeToString(raw)),
		name + " base64 url":     []byte(base64.URLEncoding.EncodeToString(raw)),
		name + " base64 raw url": []byte(base64.RawURLEncoding.EncodeToString(raw)),
	}
}

func scan(t *testing.T, where string, data []byte, secrets map[string][]byte) {
	t.Helper()
	for name, s := range secrets {
		if bytes.Contains(data, s) {
			t.Errorf("G1: %s found in %s", name, where)
		}
	}
}

// TestNoPlaintextKeyWritten (G1): every byte the package produces — the
// bundles, the files and directories the writer leaves, every error and
// every log line — is scanned for the VM key and for the bundle key, raw,
// in hex of both cases and in four base64 forms. None is found.
func TestNoPlaintextKeyWritten(t *testing.T) {
	installTestPlugin(t)
	prec, pid := pluginKeys(t)
	log, hook := logtest.NewNullLogger()
	log.SetLevel(logrus.TraceLevel)
	for _, pq := range []bool{false, true} {
		t.Run(fmt.Sprintf("pq=%v", pq), func(t *testing.T) {
			hook.Reset()
			cs := newCustodians(t, 3, pq)
			cfg := Config{Threshold: 2}
			for _, c := range cs {
				cfg.Custodians = append(cfg.Custodians, CustodianConfig{Name: c.name, Recipients: []string{c.recipient}})
			}
			if !pq {
				cfg.Custodians = append(cfg.Custodians, CustodianConfig{Name: "token", Recipients: []string{prec}})
			}
			p, err := cfg.Policy(NonInteractiveUI(log))
			if err != nil {
				t.Fatal(err)
			}
			key, raw := knownKey(t)
			rec := &recordingReader{}
			s, _ := NewSealer(p, SealerOptions{Rand: rec, Log: log})
			state := testState(4096)
			secrets := forms("VM key", raw)
			var errs []string
			dir := t.TempDir()
			w := &Writer{Layout: Layout{Dir: dir}, Keep: 2, Log: log}
			for i := range 3 {
				c := testContents(state)
				c.Generation = uint64(7 + i)
				b, err := s.Seal(context.Background(), c, key)
				if err != nil {
					t.Fatal(err)
				}
				bk := bytes.Clone(rec.got[idBytes : idBytes+32])
				// The recorded bytes are the bundle key: they open the sealed VM key.
				d := mustDecode(t, b)
				sealer, _ := bundleSealer(bk, rec.got[:idBytes], nil)
				if k, err := sealer.OpenKey(vtpm.Sealed{Nonce: d.nonce, Ciphertext: d.ct}, keyBinding(d.ad, c.Generation)); err != nil || !k.Equal(key) {
					t.Fatalf("the scan would look for the wrong bundle key: %v", err)
				}
				for n, v := range forms(fmt.Sprintf("bundle key %d", i), bk) {
					secrets[n] = v
				}
				rec.got = nil
				scan(t, "bundle", b, secrets)
				if _, err := w.Write(context.Background(), b); err != nil {
					t.Fatal(err)
				}
				// Refusals and their errors.
				for _, ids := range [][]*Identity{nil, identitiesOf(t, cs[0]), identitiesOf(t, newCustodians(t, 1, pq)...)} {
					if _, err := Open(context.Background(), b, testVM, ids, OpenOptions{Log: log}); err != nil {
						errs = append(errs, fmt.Sprintf("%v %+v %#v", err, err, err))
					}
				}
				m := reframe(t, b, func(f *frame) { f.state[0] ^= 1 })
				if _, err := Open(context.Background(), m, testVM, identitiesOf(t, cs...), OpenOptions{Log: log}); err != nil {
					errs = append(errs, err.Error())
				}
				ids := identitiesOf(t, cs[1], cs[2])
				if !pq {
					tok, _ := ParseIdentity(pid, "token.key", NonInteractiveUI(log))
					ids = append(ids[:1], tok)
				}
				o, err := Open(context.Background(), b, testVM, ids, OpenOptions{Log: log})
				if err != nil {
					t.Fatal(err)
				}
				errs = append(errs, fmt.Sprintf("%v %+v %#v %v", o, o, o, o.Key()))
				o.Destroy()
			}
			if _, err := w.Prune(context.Background(), testVM, 9); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Seal(context.Background(), Contents{VM: VM{UUID: "x"}}, key); err != nil {
				errs = append(errs, err.Error())
			}
			scan(t, "errors", []byte(strings.Join(errs, "\n")), secrets)
			var logs bytes.Buffer
			for _, e := range hook.AllEntries() {
				line, _ := e.String()
				logs.WriteString(line)
			}
			if logs.Len() == 0 {
				t.Fatal("nothing was logged: the log scan would prove nothing")
			}
			scan(t, "logs", logs.Bytes(), secrets)
			files := 0
			err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
				if err != nil {
					return err
				}
				scan(t, "file name "+path, []byte(path), secrets)
				info, _ := d.Info()
				if d.IsDir() {
					if info.Mode().Perm() != 0o700 && path != dir {
						t.Errorf("%s: mode %v, want 0700", path, info.Mode().Perm())
					}
					return nil
				}
				files++
				if info.Mode().Perm() != 0o600 {
					t.Errorf("%s: mode %v, want 0600", path, info.Mode().Perm())
				}
				b, err := os.ReadFile(path)
				if err != nil {
					return err
				}
				scan(t, path, b, secrets)
				return nil
			})
			if err != nil || files != 2 {
				t.Fatalf("%d files (want 2 after pruning to 2): %v", files, err)
			}
		})
	}
}
