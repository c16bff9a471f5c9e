package attest

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

type expectedEntry struct {
	Files     []string                     `json:"files"`
	SHA1      map[string]string            `json:"sha1"`
	SHA256    map[string]string            `json:"sha256"`
	SHA384    map[string]string            `json:"sha384"`
	Other     map[string]map[string]string `json:"other_pcrs"`
	WithEvent []int                        `json:"pcrs_with_events_in_log"`
}

func loadExpected(t testing.TB) []expectedEntry {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(rw, "expected-pcrs.json"))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Entries []expectedEntry `json:"entries"`
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	return doc.Entries
}

// want returns bank → pcr → value for the PCRs that have events in the log.
func (e expectedEntry) want() PCRValues {
	out := PCRValues{}
	add := func(bank Bank, m map[string]string) {
		for k, v := range m {
			i, _ := strconv.Atoi(k)
			has := false
			for _, p := range e.WithEvent {
				has = has || p == i
			}
			if !has {
				continue
			}
			b, _ := hex.DecodeString(v)
			if out[bank] == nil {
				out[bank] = map[int][]byte{}
			}
			out[bank][i] = b
		}
	}
	add("sha1", e.SHA1)
	add("sha256", e.SHA256)
	add("sha384", e.SHA384)
	for bank, m := range e.Other {
		add(Bank(bank), m)
	}
	return out
}

func readLog(t testing.TB, rel string) *EventLog {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(rw, rel))
	if err != nil {
		t.Fatal(err)
	}
	l, err := ParseEventLog(data)
	if err != nil {
		t.Fatalf("%s: %v", rel, err)
	}
	return l
}

func TestParseEventLogsRealWorld(t *testing.T) {
	tests := []struct {
		file        string
		cryptoAgile bool
		banks       string
		secureBoot  string // "on", "off", "absent"
	}{
		{"eventlogs/ubuntu-2104-no-secure-boot.bin", true, "sha1,sha256,sha384", "off"},
		{"eventlogs/debian-10.bin", false, "sha1", "on"},
		{"eventlogs/glinux-alex.bin", true, "sha1,sha256", "off"},
		{"eventlogs/crypto_agile_eventlog", true, "sha256", "off"},
		{"eventlogs/sb_cert_eventlog", true, "sha1,sha256,sha384", "on"},
		{"eventlogs/windows_gcp_shielded_vm.eventlog.bin", false, "sha1", "on"},
		{"attestations/extracted/gce-cos-85.eventlog.bin", true, "sha1,sha256,sha384", "on"},
	}
	for _, tt := range tests {
		t.Run(filepath.Base(tt.file), func(t *testing.T) {
			l := readLog(t, tt.file)
			if l.CryptoAgile != tt.cryptoAgile {
				t.Errorf("CryptoAgile = %v, want %v", l.CryptoAgile, tt.cryptoAgile)
			}
			var banks []string
			for _, b := range l.Banks {
				banks = append(banks, string(b))
			}
			if tt.banks != "" && strings.Join(banks, ",") != tt.banks {
				t.Errorf("banks = %v, want %s", banks, tt.banks)
			}
			if len(l.Events) < 10 {
				t.Errorf("only %d events", len(l.Events))
			}
			f, err := l.Facts()
			if err != nil {
				t.Fatal(err)
			}
			sb := "absent"
			if f.SecureBoot != nil {
				sb = map[bool]string{true: "on", false: "off"}[*f.SecureBoot]
			}
			if tt.secureBoot != "" && sb != tt.secureBoot {
				t.Errorf("secure boot %s, want %s", sb, tt.secureBoot)
			}
			t.Logf("%d events, banks %v, secure boot %s, %d boot components, separators %v", len(l.Events), banks, sb, len(f.BootComponents), f.Separators)
		})
	}
}

func TestReplayMatchesGroundTruth(t *testing.T) {
	for _, e := range loadExpected(t) {
		for _, f := range e.Files {
			if strings.HasSuffix(f, ".pb") || strings.HasSuffix(f, ".json") {
				continue
			}
			t.Run(filepath.Base(f), func(t *testing.T) {
				got := readLog(t, f).Replay()
				want := e.want()
				n := 0
				for bank, pcrs := range want {
					for i, w := range pcrs {
						g, ok := got[bank][i]
						if !ok {
							t.Errorf("%s PCR %d: not replayed", bank, i)
							continue
						}
						if hex.EncodeToString(g) != hex.EncodeToString(w) {
							t.Errorf("%s PCR %d: replay %x, truth %x", bank, i, g, w)
						}
						n++
					}
				}
				if n == 0 {
					t.Fatal("no ground-truth values compared")
				}
			})
		}
	}
}

func TestReplayTampered(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(rw, "attestations/extracted/gce-cos-85.eventlog.bin"))
	if err != nil {
		t.Fatal(err)
	}
	orig, err := ParseEventLog(data)
	if err != nil {
		t.Fatal(err)
	}
	want := orig.Replay()
	// Flip one byte of the last event's SHA-256 digest: find it in the raw log.
	last := orig.Events[len(orig.Events)-1]
	d := last.Digests["sha256"]
	off := strings.LastIndex(string(data), string(d))
	if off < 0 {
		t.Fatal("digest not found")
	}
	tampered := append([]byte(nil), data...)
	tampered[off] ^= 0xff
	l, err := ParseEventLog(tampered)
	if err != nil {
		t.Fatal(err)
	}
	got := l.Replay()
	if string(got["sha256"][last.PCR]) == string(want["sha256"][last.PCR]) {
		t.Fatalf("tampered log replays to the same PCR %d", last.PCR)
	}
	if string(got["sha1"][last.PCR]) != string(want["sha1"][last.PCR]) {
		t.Fatalf("sha1 bank changed although only the sha256 digest was tampered")
	}
}

func TestParseEventLogMalformed(t *testing.T) {
	good, err := os.ReadFile(filepath.Join(rw, "eventlogs/ubuntu-2104-no-secure-boot.bin"))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"short", []byte("hello")},
		{"truncated in the middle", good[:len(good)/2+3]},
		{"huge event size", func() []byte {
			b := append([]byte(nil), good[:32]...)
			b[28], b[29], b[30], b[31] = 0xff, 0xff, 0xff, 0x7f
			return b
		}()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := ParseEventLog(tt.data); !errors.Is(err, ErrMalformedEventLog) {
				t.Fatalf("err = %v, want ErrMalformedEventLog", err)
			}
		})
	}
}

// TestStartupLocality: the glinux-alex laptop log starts with a
// StartupLocality 3 EV_NO_ACTION event; PCR 0 must start at 00..03 or the
// replay misses the ground truth.
func TestStartupLocality(t *testing.T) {
	l := readLog(t, "eventlogs/glinux-alex.bin")
	if l.startupLocality != 3 {
		t.Fatalf("startup locality %d, want 3", l.startupLocality)
	}
	var want expectedEntry
	for _, e := range loadExpected(t) {
		if e.Files[0] == "eventlogs/glinux-alex.bin" {
			want = e
		}
	}
	truth := want.want()["sha256"][0]
	if got := l.Replay()["sha256"][0]; string(got) != string(truth) {
		t.Fatalf("PCR 0 %x, want %x", got, truth)
	}
	l.startupLocality = 0
	if got := l.Replay()["sha256"][0]; string(got) == string(truth) {
		t.Fatal("PCR 0 does not depend on the startup locality")
	}
}
