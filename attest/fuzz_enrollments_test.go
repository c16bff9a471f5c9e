package attest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// FuzzFileEnrollments: the enrolments file is read on every lookup, and
// anyone who can write it decides which AKs are trusted. Whatever it
// holds, lookups never panic; a file that loads takes a new record and
// then holds exactly its old records and the new one.
func FuzzFileEnrollments(f *testing.F) {
	at := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	list := []Enrollment{
		{Host: "host-a", EKDigest: bytes.Repeat([]byte{1}, 32), AKName: append([]byte{0, 0xb}, bytes.Repeat([]byte{2}, 32)...), EnrolledAt: at},
		{Host: "host-b", EKDigest: bytes.Repeat([]byte{3}, 32), AKName: append([]byte{0, 0xb}, bytes.Repeat([]byte{4}, 32)...), EnrolledAt: at,
			Method: MethodAKCertificate, AKCertDigest: bytes.Repeat([]byte{5}, 32)},
	}
	good, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte("[]"))
	f.Add([]byte("null"))
	f.Add([]byte(`[{"host":"host-a","ek_digest":"zz"}]`))
	f.Add([]byte(`[{"host":"host-c","ek_digest":"0101","ak_name":"0202","enrolled_at":"2026-12-06T10:00:00+02:00"}]`))
	newRec := Enrollment{Host: "host-new", EKDigest: bytes.Repeat([]byte{0xee}, 32), AKName: bytes.Repeat([]byte{0xaa}, 34), EnrolledAt: at, Method: MethodActivation}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(dir, "enrollments.json")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		store := &FileEnrollments{Path: path}
		before, err := store.load()
		if err != nil {
			return
		}
		for _, e := range before {
			if _, err := store.Find(ctx, e.EKDigest, e.AKName); err != nil {
				t.Fatalf("a loaded file fails a lookup: %v", err)
			}
			_, _ = store.Activated(ctx, e.EKDigest, e.AKName)
		}
		if err := store.Add(ctx, newRec); err != nil {
			var re *RefusalError
			if !errors.As(err, &re) || re.Rule != RuleEnrolledHost {
				t.Fatalf("add to a loaded file: %v", err)
			}
			return
		}
		after, err := (&FileEnrollments{Path: path}).load()
		if err != nil {
			t.Fatalf("the file written by Add does not load: %v", err)
		}
		want, _ := json.Marshal(append(append([]Enrollment(nil), before...), newRec))
		got, _ := json.Marshal(after)
		if !bytes.Equal(want, got) {
			t.Fatalf("Add changed the other records:\n%s\n%s", want, got)
		}
		if e, err := (&FileEnrollments{Path: path}).Find(ctx, newRec.EKDigest, newRec.AKName); err != nil || e == nil || e.Host != newRec.Host {
			t.Fatalf("the new record is not found: %v %+v", err, e)
		}
	})
}
