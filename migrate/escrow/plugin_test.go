package escrow

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"filippo.io/age"
	"filippo.io/age/plugin"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
)

// The test plugin is this test binary, run as age-plugin-vtpmmtest through
// a symlink on PATH: a real age plugin process speaking the real plugin
// protocol over stdin and stdout, like a hardware-token plugin. Its keys
// are X25519: recipient data is the public key, identity data the private
// one; the stanza is "vtpmmtest <ephemeral>" with the file key under
// AES-256-GCM. Identity data starting with "fail" makes it fail, and it
// shows a "touch" message on every unwrap.
const testPluginName = "vtpmmtest"

func TestMain(m *testing.M) {
	if filepath.Base(os.Args[0]) == "age-plugin-"+testPluginName {
		os.Exit(runTestPlugin())
	}
	os.Exit(m.Run())
}

func runTestPlugin() int {
	p, err := plugin.New(testPluginName)
	if err != nil {
		return 1
	}
	fs := flag.NewFlagSet("age-plugin-"+testPluginName, flag.ContinueOnError)
	p.RegisterFlags(fs)
	if err := fs.Parse(os.Args[1:]); err != nil {
		return 2
	}
	p.HandleRecipient(func(data []byte) (age.Recipient, error) {
		pk, err := ecdh.X25519().NewPublicKey(data)
		if err != nil {
			return nil, err
		}
		return testPluginRecipient{pk}, nil
	})
	p.HandleIdentity(func(data []byte) (age.Identity, error) {
		if bytes.HasPrefix(data, []byte("fail")) {
			return testPluginIdentity{fail: true, p: p}, nil
		}
		sk, err := ecdh.X25519().NewPrivateKey(data)
		if err != nil {
			return nil, err
		}
		return testPluginIdentity{sk: sk, p: p}, nil
	})
	return p.Main()
}

type testPluginRecipient struct{ pk *ecdh.PublicKey }

func testPluginAEAD(shared, eph, pk []byte) cipher.AEAD {
	k, _ := hkdf.Key(sha256.New, shared, append(bytes.Clone(eph), pk...), "vtpmmtest", 32)
	b, _ := aes.NewCipher(k)
	a, _ := cipher.NewGCM(b)
	return a
}

func (r testPluginRecipient) Wrap(fileKey []byte) ([]*age.Stanza, error) {
	eph, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	shared, err := eph.ECDH(r.pk)
	if err != nil {
		return nil, err
	}
	a := testPluginAEAD(shared, eph.PublicKey().Bytes(), r.pk.Bytes())
	return []*age.Stanza{{Type: testPluginName, Args: []string{base64.RawStdEncoding.EncodeToString(eph.PublicKey().Bytes())},
		Body: a.Seal(nil, make([]byte, 12), fileKey, nil)}}, nil
}

type testPluginIdentity struct {
	sk   *ecdh.PrivateKey
	fail bool
	p    *plugin.Plugin
}

func (i testPluginIdentity) Unwrap(stanzas []*age.Stanza) ([]byte, error) {
	if err := i.p.DisplayMessage("touch your test token"); err != nil {
		return nil, err
	}
	if i.fail {
		return nil, errors.New("test token unplugged")
	}
	for _, s := range stanzas {
		if s.Type != testPluginName || len(s.Args) != 1 {
			continue
		}
		ephBytes, err := base64.RawStdEncoding.DecodeString(s.Args[0])
		if err != nil {
			continue
		}
		eph, err := ecdh.X25519().NewPublicKey(ephBytes)
		if err != nil {
			continue
		}
		shared, err := i.sk.ECDH(eph)
		if err != nil {
			continue
		}
		pt, err := testPluginAEAD(shared, ephBytes, i.sk.PublicKey().Bytes()).Open(nil, make([]byte, 12), s.Body, nil)
		if err == nil {
			return pt, nil
		}
	}
	return nil, age.ErrIncorrectIdentity
}

// installTestPlugin puts age-plugin-vtpmmtest on PATH.
func installTestPlugin(t *testing.T) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.Symlink(exe, filepath.Join(dir, "age-plugin-"+testPluginName)); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
}

// pluginKeys returns a plugin recipient and identity string.
func pluginKeys(t *testing.T) (recipient, identity string) {
	t.Helper()
	sk, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return plugin.EncodeRecipient(testPluginName, sk.PublicKey().Bytes()), plugin.EncodeIdentity(testPluginName, sk.Bytes())
}

// TestPluginCustodian runs the real plugin process for sealing and for
// opening: a 2-of-3 bundle where one custodian's key lives in a plugin.
func TestPluginCustodian(t *testing.T) {
	installTestPlugin(t)
	prec, pid := pluginKeys(t)
	cs := newCustodians(t, 2, false)
	log, hook := logtest.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	cfg := Config{Threshold: 2, Custodians: []CustodianConfig{
		{Name: "token-holder", Recipients: []string{prec}},
		{Name: cs[0].name, Recipients: []string{cs[0].recipient}},
		{Name: cs[1].name, Recipients: []string{cs[1].recipient}},
	}}
	p, err := cfg.Policy(NonInteractiveUI(log))
	if err != nil {
		t.Fatal(err)
	}
	if k := p.Custodians()[0].Recipients[0].Kind(); k != Kind("plugin:"+testPluginName) {
		t.Fatalf("kind %q", k)
	}
	key, _ := knownKey(t)
	b := seal(t, p, testContents(testState(100)), key)
	h, _ := Inspect(b)
	if h.Custodians[0].Recipients[0].Kind != "plugin:vtpmmtest" {
		t.Fatalf("label %+v", h.Custodians[0].Recipients[0])
	}

	tokenID, err := ParseIdentity(pid, "token.key", NonInteractiveUI(log))
	if err != nil {
		t.Fatal(err)
	}
	ids := append([]*Identity{tokenID}, identitiesOf(t, cs[1])...)
	o, err := Open(context.Background(), b, testVM, ids, OpenOptions{Log: log})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Destroy()
	if !o.Key().Equal(key) || o.Used[0] != "token-holder" {
		t.Fatalf("used %v", o.Used)
	}
	touched := false
	for _, e := range hook.AllEntries() {
		touched = touched || (e.Message == "touch your test token" && e.Data["plugin"] == testPluginName)
	}
	if !touched {
		t.Error("the plugin's message did not reach the logger")
	}

	// A plugin that fails: named in the refusal, with the plugin error.
	failID, err := ParseIdentity(plugin.EncodeIdentity(testPluginName, []byte("fail-now")), "broken.key", nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = Open(context.Background(), b, testVM, append([]*Identity{failID}, identitiesOf(t, cs[1])...), OpenOptions{})
	if !errors.Is(err, ErrNotEnoughShares) || !strings.Contains(err.Error(), "custodian token-holder: age plugin failed") || !strings.Contains(err.Error(), "test token unplugged") {
		t.Fatalf("failing plugin: %v", err)
	}
	// The plugin is run only for custodians it can serve: with the token
	// identity alone, 1 share opens (its own), and the error names the others.
	_, err = Open(context.Background(), b, testVM, []*Identity{tokenID}, OpenOptions{})
	var se *SharesError
	if !errors.As(err, &se) || len(se.Opened) != 1 || se.Opened[0] != "token-holder" {
		t.Fatalf("token alone: %v", err)
	}
}

func TestPluginMissing(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	r, _ := pluginKeys(t)
	rec, err := ParseRecipient(strings.Replace(r, "vtpmmtest", "vtpmmnone", 1), nil)
	if err == nil {
		t.Fatalf("a recipient with a bad checksum parsed: %v", rec)
	}
	sk, _ := ecdh.X25519().GenerateKey(rand.Reader)
	rec, err = ParseRecipient(plugin.EncodeRecipient("vtpmmnone", sk.PublicKey().Bytes()), nil)
	if err != nil {
		t.Fatal(err)
	}
	cs := newCustodians(t, 1, false)
	x, _ := ParseRecipient(cs[0].recipient, nil)
	p, err := NewPolicy(1, []Custodian{{Name: "a", Recipients: []Recipient{x}}, {Name: "b", Recipients: []Recipient{rec}}})
	if err != nil {
		t.Fatal(err)
	}
	s, _ := NewSealer(p, SealerOptions{})
	key, _ := knownKey(t)
	_, err = s.Seal(context.Background(), testContents(nil), key)
	var nf *plugin.NotFoundError
	if !errors.Is(err, ErrPlugin) || !errors.As(err, &nf) || !strings.Contains(err.Error(), "custodian b") {
		t.Fatalf("missing plugin: %v", err)
	}
}
