package main

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// FuzzReadPredicted: a --predict file of vtpmd vault reseal names the PCR
// values the vault is sealed to after a planned update (written by hand,
// or by vtpmctl eventlog replay). Whatever it accepts names each PCR once,
// within 0..23, with a SHA-256 value, and reads back the same from its
// own flat form.
func FuzzReadPredicted(f *testing.F) {
	v := hex.EncodeToString(bytes.Repeat([]byte{0xab}, 32))
	f.Add([]byte(`{"7":"` + v + `"}`))
	f.Add([]byte(`{"sha256":{"0":"` + v + `","7":"` + v + `"},"sha1":{"7":"00"}}`))
	f.Add([]byte(`{"24":"` + v + `"}`))
	f.Add([]byte(`{"sha256":{}}`))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(dir, "predict.json")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := readPredicted(path)
		if err != nil {
			return
		}
		var banks map[string]map[string]string
		var flat map[string]string
		n := len(got)
		if json.Unmarshal(data, &banks) == nil && banks["sha256"] != nil {
			n = len(banks["sha256"])
		} else if json.Unmarshal(data, &flat) == nil {
			n = len(flat)
		}
		if n != len(got) {
			t.Fatalf("%d entries read as %d PCRs: two of them name the same PCR", n, len(got))
		}
		again := map[string]string{}
		for i, d := range got {
			if i < 0 || i > 23 || len(d) != 32 {
				t.Fatalf("accepted PCR %d = %x", i, d)
			}
			again[strconv.Itoa(i)] = hex.EncodeToString(d)
		}
		b, _ := json.Marshal(again)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		got2, err := readPredicted(path)
		if err != nil || len(got2) != len(got) {
			t.Fatalf("the flat form does not read back: %v", err)
		}
		for i, d := range got {
			if !bytes.Equal(got2[i], d) {
				t.Fatalf("PCR %d changed", i)
			}
		}
	})
}
