package attest

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

var field = filepath.Join("testdata", "field")

// fieldTruth reads a ground-truth file of testdata/field/eventlogs.
func fieldTruth(t testing.TB, name string) PCRValues {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(field, "eventlogs", name))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		PCRs map[string]map[string]string `json:"pcrs"`
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	out := PCRValues{}
	for bank, m := range doc.PCRs {
		out[Bank(bank)] = map[int][]byte{}
		for k, v := range m {
			i, _ := strconv.Atoi(k)
			out[Bank(bank)][i], _ = hex.DecodeString(v)
		}
	}
	return out
}

// compareReplay checks every ground-truth value against the replay.
func compareReplay(t *testing.T, got, want PCRValues) {
	t.Helper()
	n := 0
	for bank, pcrs := range want {
		for i, w := range pcrs {
			g, ok := got[bank][i]
			if !ok {
				t.Errorf("%s PCR %d: not replayed", bank, i)
				continue
			}
			if !bytes.Equal(g, w) {
				t.Errorf("%s PCR %d: replay %x, truth %x", bank, i, g, w)
			}
			n++
		}
	}
	if n == 0 {
		t.Fatal("no ground-truth value compared")
	}
}

// TestHCRTMReplay: a log whose first PCR 0 event is EV_EFI_HCRTM_EVENT
// replays PCR 0 from locality 4 in every bank, and matches the PCRs of a
// TPM (swtpm/libtpms) that ran the H-CRTM sequence before TPM2_Startup.
func TestHCRTMReplay(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(field, "eventlogs", "hcrtm-swtpm.bin"))
	if err != nil {
		t.Fatal(err)
	}
	l, err := ParseEventLog(data)
	if err != nil {
		t.Fatal(err)
	}
	if loc, why := l.PCR0Locality(); loc != 4 {
		t.Fatalf("PCR 0 locality %d (%s), want 4", loc, why)
	}
	truth := fieldTruth(t, "hcrtm-swtpm.pcrs.json")
	if len(truth) != 3 {
		t.Fatalf("ground truth has %d banks, want sha1, sha256, sha384", len(truth))
	}
	compareReplay(t, l.Replay(), truth)
	// Without the H-CRTM rule PCR 0 misses the TPM's value in every bank.
	l.hcrtm = false
	for bank := range truth {
		if bytes.Equal(l.Replay()[bank][0], truth[bank][0]) {
			t.Errorf("%s PCR 0 does not depend on the H-CRTM start", bank)
		}
	}
}

func TestHCRTMNotFirstRefused(t *testing.T) {
	// The H-CRTM event moved after another PCR 0 measurement.
	l := mustLog(t, filepath.Join(field, "eventlogs", "hcrtm-swtpm.bin"))
	evs := append([]Event(nil), l.Events...)
	var pcr0 []int
	for i, e := range evs {
		if e.PCR == 0 && e.Type != EvNoAction {
			pcr0 = append(pcr0, i)
		}
	}
	evs[pcr0[0]], evs[pcr0[1]] = evs[pcr0[1]], evs[pcr0[0]]
	raw := encodeAgileLog(t, agileAlgs(l), evs, nil)
	if _, err := ParseEventLog(raw); !errors.Is(err, ErrMalformedEventLog) {
		t.Fatalf("err = %v, want ErrMalformedEventLog", err)
	}
}

// TestNoActionOutsidePCRs: Windows-style logs end with EV_NO_ACTION events
// on PCR index 0xFFFFFFFF. They are parsed (not range-checked) and never
// extended: a real log with such an event appended still replays to the
// machine's own recorded PCRs. A measured event on that index is refused.
func TestNoActionOutsidePCRs(t *testing.T) {
	noAction := Event{PCR: 0xFFFFFFFF, Type: EvNoAction, Data: []byte("vtpmm: Windows-style trailing EV_NO_ACTION")}
	measured := Event{PCR: 0xFFFFFFFF, Type: EvIPL, Data: []byte("not extendable")}
	entries := loadExpected(t)
	tests := []struct {
		name, file string
		truth      expectedEntry
	}{
		{"crypto-agile GCE COS-85 (quoted PCRs)", "attestations/extracted/gce-cos-85.eventlog.bin", entries[0]},
		{"legacy SHA-1 Windows GCP (quoted PCRs)", "eventlogs/windows_gcp_shielded_vm.eventlog.bin", entries[1]},
		{"crypto-agile Ubuntu 21.04 (recorded PCRs)", "eventlogs/ubuntu-2104-no-secure-boot.bin", entries[2]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			orig := readLog(t, tt.file)
			raw := appendEvents(t, orig, readFile(t, tt.file), noAction, noAction)
			l, err := ParseEventLog(raw)
			if err != nil {
				t.Fatalf("log with a 0xFFFFFFFF EV_NO_ACTION refused: %v", err)
			}
			if got, want := len(l.Events), len(orig.Events)+2; got != want {
				t.Fatalf("%d events, want %d", got, want)
			}
			last := l.Events[len(l.Events)-1]
			if last.PCR != 0xFFFFFFFF || last.Type != EvNoAction {
				t.Fatalf("last event %+v", last)
			}
			compareReplay(t, l.Replay(), tt.truth.want())
			if _, err := ParseEventLog(appendEvents(t, orig, readFile(t, tt.file), measured)); !errors.Is(err, ErrMalformedEventLog) {
				t.Fatalf("measured event on PCR 0xFFFFFFFF: err = %v, want ErrMalformedEventLog", err)
			}
		})
	}
}

// TestUnknownBankSkipped: a log that also carries an SM3_256 bank (0x0012,
// unknown to the parser) is parsed by skipping the SM3 digests by the size
// the Spec ID event declares; the known banks still replay to the quoted
// PCRs. A wrong declared size shifts the parse and is caught.
func TestUnknownBankSkipped(t *testing.T) {
	const algSM3 = 0x0012
	file := "attestations/extracted/gce-cos-85.eventlog.bin"
	orig := readLog(t, file)
	sm3 := func(e Event) []byte { d := sha256.Sum256(append([]byte("sm3 stand-in "), e.Data...)); return d[:] }
	algs := append(agileAlgs(orig), specAlg{algSM3, 32})
	raw := encodeAgileLog(t, algs, orig.Events, map[uint16]func(Event) []byte{algSM3: sm3})
	l, err := ParseEventLog(raw)
	if err != nil {
		t.Fatalf("log with an SM3_256 bank refused: %v", err)
	}
	if u := l.UnknownAlgorithms(); len(u) != 1 || u[0] != algSM3 {
		t.Fatalf("unknown algorithms %v, want [0x0012]", u)
	}
	if len(l.Events) != len(orig.Events) {
		t.Fatalf("%d events, want %d", len(l.Events), len(orig.Events))
	}
	compareReplay(t, l.Replay(), loadExpected(t)[0].want())
	if note := l.replayNote(); !bytes.Contains([]byte(note), []byte("0x0012 skipped")) {
		t.Fatalf("replay note %q does not name the skipped bank", note)
	}

	// Declared 32 bytes, written 20: the parse goes off the rails and is
	// refused (or the replay no longer matches), never silently accepted.
	short := encodeAgileLog(t, algs, orig.Events, map[uint16]func(Event) []byte{algSM3: func(e Event) []byte { return sm3(e)[:20] }})
	if l, err := ParseEventLog(short); err == nil {
		if bytes.Equal(l.Replay()["sha256"][7], loadExpected(t)[0].want()["sha256"][7]) {
			t.Fatal("a log with mis-sized SM3 digests replays to the quoted PCRs")
		}
	}
}

func mustLog(t *testing.T, path string) *EventLog {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	l, err := ParseEventLog(data)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

type specAlg struct {
	id   uint16
	size int
}

// agileAlgs returns the known banks of l as Spec ID entries.
func agileAlgs(l *EventLog) []specAlg {
	var out []specAlg
	for _, b := range l.Banks {
		h, _ := b.Hash()
		out = append(out, specAlg{uint16(bankAlg(b)), h.Size()})
	}
	return out
}

// encodeAgileLog writes a crypto-agile log with a Spec ID event for algs
// and events; digests of algorithms that are not known banks come from
// extra.
func encodeAgileLog(t testing.TB, algs []specAlg, events []Event, extra map[uint16]func(Event) []byte) []byte {
	t.Helper()
	le := binary.LittleEndian
	spec := []byte("Spec ID Event03\x00")
	spec = le.AppendUint32(spec, 0)
	spec = append(spec, 0, 2, 0, 2)
	spec = le.AppendUint32(spec, uint32(len(algs)))
	for _, a := range algs {
		spec = le.AppendUint16(spec, a.id)
		spec = le.AppendUint16(spec, uint16(a.size))
	}
	spec = append(spec, 0)
	var out []byte
	out = le.AppendUint32(out, 0)
	out = le.AppendUint32(out, uint32(EvNoAction))
	out = append(out, make([]byte, 20)...)
	out = le.AppendUint32(out, uint32(len(spec)))
	out = append(out, spec...)
	for _, e := range events {
		out = le.AppendUint32(out, uint32(e.PCR))
		out = le.AppendUint32(out, uint32(e.Type))
		out = le.AppendUint32(out, uint32(len(algs)))
		for _, a := range algs {
			out = le.AppendUint16(out, a.id)
			if bank, _, ok := bankForAlg(a.id); ok {
				d := e.Digests[bank]
				if d == nil {
					d = make([]byte, a.size)
				}
				out = append(out, d...)
			} else {
				out = append(out, extra[a.id](e)...)
			}
		}
		out = le.AppendUint32(out, uint32(len(e.Data)))
		out = append(out, e.Data...)
	}
	return out
}

// appendEvents appends events to the raw log orig was parsed from, in its
// own format (zero digests: EV_NO_ACTION digests are zero).
func appendEvents(t testing.TB, orig *EventLog, raw []byte, events ...Event) []byte {
	t.Helper()
	out := bytes.Clone(raw)
	le := binary.LittleEndian
	for _, e := range events {
		out = le.AppendUint32(out, uint32(e.PCR))
		out = le.AppendUint32(out, uint32(e.Type))
		if orig.CryptoAgile {
			algs := agileAlgs(orig)
			out = le.AppendUint32(out, uint32(len(algs)))
			for _, a := range algs {
				out = le.AppendUint16(out, a.id)
				out = append(out, make([]byte, a.size)...)
			}
		} else {
			out = append(out, make([]byte, 20)...)
		}
		out = le.AppendUint32(out, uint32(len(e.Data)))
		out = append(out, e.Data...)
	}
	return out
}
