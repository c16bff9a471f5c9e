package audit

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

// mutate returns the golden log changed by f, which gets its lines
// (each with its newline).
func mutate(t *testing.T, f func(lines [][]byte) [][]byte) []byte {
	t.Helper()
	lines := bytes.SplitAfter(golden(t), []byte("\n"))
	lines = lines[:len(lines)-1] // the empty element after the last newline
	cp := make([][]byte, len(lines))
	for i, l := range lines {
		cp[i] = append([]byte(nil), l...)
	}
	return bytes.Join(f(cp), nil)
}

// rehash recomputes the hash of one line, as someone who edits a record
// and fixes its own hash (but not the chain) would.
func rehash(t *testing.T, line []byte) []byte {
	t.Helper()
	var r Record
	if err := json.Unmarshal(bytes.TrimSuffix(line, []byte("\n")), &r); err != nil {
		t.Fatal(err)
	}
	out, _, err := encode(r)
	if err != nil {
		t.Fatal(err)
	}
	return append(out, '\n')
}

func TestVerify(t *testing.T) {
	tests := []struct {
		name     string
		data     []byte
		wantErr  error // nil: valid
		wantLine int
		wantSeq  uint64
		wantMsg  string
	}{
		{"golden", golden(t), nil, 0, 0, ""},
		{"empty log", nil, nil, 0, 0, ""},
		{"one byte edited in a middle record", mutate(t, func(l [][]byte) [][]byte {
			l[2] = bytes.Replace(l[2], []byte(`"generation":4`), []byte(`"generation":5`), 1)
			return l
		}), ErrTampered, 3, 3, "record 3: hash mismatch (edited?)"},
		{"record edited and rehashed", mutate(t, func(l [][]byte) [][]byte {
			l[1] = rehash(t, bytes.Replace(l[1], []byte("PCR 7 differs"), []byte("all fine"), 1))
			return l
		}), ErrTampered, 3, 3, "record 3: prev does not match record 2 (deleted or reordered?)"},
		{"space inserted", mutate(t, func(l [][]byte) [][]byte {
			l[1] = bytes.Replace(l[1], []byte(`,"event"`), []byte(`, "event"`), 1)
			return l
		}), ErrTampered, 2, 2, "record 2: not in canonical form"},
		{"middle line deleted", mutate(t, func(l [][]byte) [][]byte {
			return append(l[:2], l[3:]...)
		}), ErrTampered, 3, 4, "record 4 (line 3): prev does not match record 2 (deleted or reordered?)"},
		{"first line deleted", mutate(t, func(l [][]byte) [][]byte { return l[1:] }),
			ErrTampered, 1, 2, "record 2 (line 1): prev is not the genesis value"},
		{"lines swapped", mutate(t, func(l [][]byte) [][]byte {
			l[1], l[2] = l[2], l[1]
			return l
		}), ErrTampered, 2, 3, "record 3 (line 2): prev does not match record 1"},
		{"line duplicated", mutate(t, func(l [][]byte) [][]byte {
			return append(l[:3], l[2:]...)
		}), ErrTampered, 4, 3, "record 3 (line 4): prev does not match record 3"},
		{"not JSON", mutate(t, func(l [][]byte) [][]byte {
			l[4] = []byte("hello\n")
			return l
		}), ErrTampered, 5, 0, "line 5: not a JSON record"},
		{"empty line", mutate(t, func(l [][]byte) [][]byte {
			return append(l[:1], append([][]byte{[]byte("\n")}, l[1:]...)...)
		}), ErrTampered, 2, 0, "line 2: not a JSON record"},
		{"hash removed", mutate(t, func(l [][]byte) [][]byte {
			i := bytes.Index(l[0], []byte(`,"hash"`))
			l[0] = append(l[0][:i], []byte("}\n")...)
			return l
		}), ErrTampered, 1, 1, "record 1: no hash"},
		{"seq rewritten consistently", func() []byte {
			// A chain whose hashes and links are right but whose seq
			// starts at 2: only the seq check catches it.
			var r Record
			_ = json.Unmarshal(bytes.SplitN(golden(t), []byte("\n"), 2)[0], &r)
			r.Seq = 2
			line, _, _ := encode(r)
			return append(line, '\n')
		}(), ErrTampered, 1, 2, "seq 2, want 1"},
		{"line too long", append(golden(t), bytes.Repeat([]byte("x"), MaxLineSize+10)...),
			ErrTampered, 6, 0, "line 6: line longer than"},
		{"truncated last line", mutate(t, func(l [][]byte) [][]byte {
			l[4] = l[4][:40]
			return l
		}), ErrTruncated, 5, 0, "line 5: incomplete last line (40 bytes"},
		{"last newline missing", bytes.TrimSuffix(golden(t), []byte("\n")), ErrTruncated, 5, 0, "line 5: incomplete last line"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sum, err := Verify(bytes.NewReader(tt.data))
			if tt.wantErr == nil {
				if err != nil {
					t.Fatal(err)
				}
				if want := bytes.Count(tt.data, []byte("\n")); sum.Records != want {
					t.Errorf("%d records, want %d", sum.Records, want)
				}
				wantLast := Genesis
				if len(tt.data) > 0 {
					lines := bytes.Split(bytes.TrimSuffix(tt.data, []byte("\n")), []byte("\n"))
					h := sha256.Sum256(lines[len(lines)-1])
					wantLast = hex.EncodeToString(h[:])
				}
				if sum.Last != wantLast {
					t.Errorf("Last %s, want %s", sum.Last, wantLast)
				}
				return
			}
			var ce *ChainError
			if !errors.Is(err, tt.wantErr) || !errors.As(err, &ce) {
				t.Fatalf("err %v, want %v", err, tt.wantErr)
			}
			if ce.Line != tt.wantLine || ce.Seq != tt.wantSeq || !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("got line %d seq %d %q; want line %d seq %d %q", ce.Line, ce.Seq, err, tt.wantLine, tt.wantSeq, tt.wantMsg)
			}
			if errors.Is(err, ErrTampered) == errors.Is(err, ErrTruncated) {
				t.Errorf("%v is both or neither tampered and truncated", err)
			}
			if sum.Records != tt.wantLine-1 {
				t.Errorf("summary counts %d valid records before line %d", sum.Records, tt.wantLine)
			}
		})
	}
}

func TestVerifyReadError(t *testing.T) {
	boom := errors.New("disk on fire")
	_, err := Verify(errReader{boom})
	if !errors.Is(err, boom) || errors.Is(err, ErrTampered) {
		t.Errorf("err %v", err)
	}
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }

func TestGenesis(t *testing.T) {
	if len(Genesis) != 64 || strings.Trim(Genesis, "0") != "" {
		t.Errorf("Genesis %q is not 64 zeros", Genesis)
	}
}
