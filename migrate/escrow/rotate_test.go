package escrow

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestBundleNames(t *testing.T) {
	l := Layout{Dir: "/var/backups/vtpmm"}
	p := l.BundlePath(testVM, 7, testNow)
	if p != "/var/backups/vtpmm/"+testVM+"/7-20261206T181200.123456789Z.vtpmbundle" {
		t.Fatalf("path %s", p)
	}
	gen, ts, ok := ParseBundleName(filepath.Base(p))
	if !ok || gen != 7 || !ts.Equal(testNow) {
		t.Fatalf("parse: %d %v %v", gen, ts, ok)
	}
	local := testNow.In(time.FixedZone("CET", 3600))
	if BundleName(7, local) != filepath.Base(p) {
		t.Error("names are in UTC whatever the zone")
	}
	for _, bad := range []string{
		"7-20261206T181200.123456789Z.vtpmbundle.tmp", ".7-20261206T181200.123456789Z.vtpmbundle.tmp-123",
		"07-20261206T181200.123456789Z.vtpmbundle", "0-20261206T181200.123456789Z.vtpmbundle",
		"x-20261206T181200.123456789Z.vtpmbundle", "7-20261206T181200Z.vtpmbundle", "7.vtpmbundle",
		"18446744073709551616-20261206T181200.123456789Z.vtpmbundle", "README",
	} {
		if _, _, ok := ParseBundleName(bad); ok {
			t.Errorf("%q parsed as a bundle name", bad)
		}
	}
}

func bf(gen uint64, minute int) BundleFile {
	return BundleFile{Generation: gen, Created: testNow.Add(time.Duration(minute) * time.Minute), Path: BundleName(gen, testNow.Add(time.Duration(minute)*time.Minute))}
}

func TestRetain(t *testing.T) {
	names := func(fs []BundleFile) (out []string) {
		for _, f := range fs {
			out = append(out, f.Path)
		}
		return out
	}
	for _, c := range []struct {
		name       string
		files      []BundleFile
		keep       int
		current    uint64
		kept, drop []BundleFile
	}{
		{"keep 2 of 4", []BundleFile{bf(3, 1), bf(3, 3), bf(3, 2), bf(3, 0)}, 2, 3,
			[]BundleFile{bf(3, 3), bf(3, 2)}, []BundleFile{bf(3, 1), bf(3, 0)}},
		{"generation beats time", []BundleFile{bf(2, 9), bf(3, 1)}, 1, 3,
			[]BundleFile{bf(3, 1)}, []BundleFile{bf(2, 9)}},
		{"keep 0 still keeps the newest of the current generation", []BundleFile{bf(3, 1), bf(3, 2)}, 0, 3,
			[]BundleFile{bf(3, 2)}, []BundleFile{bf(3, 1)}},
		{"newest of current kept although older than N newer ones", []BundleFile{bf(5, 1), bf(5, 2), bf(4, 3)}, 1, 4,
			[]BundleFile{bf(5, 2), bf(5, 1), bf(4, 3)}, nil},
		{"unknown current: the highest present", []BundleFile{bf(4, 1), bf(4, 2), bf(3, 3)}, 0, 0,
			[]BundleFile{bf(4, 2)}, []BundleFile{bf(4, 1), bf(3, 3)}},
		{"no bundle of the current generation", []BundleFile{bf(2, 1), bf(2, 2)}, 1, 3,
			[]BundleFile{bf(2, 2)}, []BundleFile{bf(2, 1)}},
		{"empty", nil, 3, 1, nil, nil},
	} {
		kept, drop := Retain(c.files, c.keep, c.current)
		if got, want := names(kept), names(c.kept); !equalStrings(got, want) {
			t.Errorf("%s: kept %v, want %v", c.name, got, want)
		}
		if got, want := names(drop), names(c.drop); !equalStrings(got, want) {
			t.Errorf("%s: dropped %v, want %v", c.name, got, want)
		}
	}
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestWriterWriteAndPrune(t *testing.T) {
	cs := newCustodians(t, 2, false)
	p := policyFor(t, 1, cs)
	key, _ := knownKey(t)
	dir := t.TempDir()
	w := &Writer{Layout: Layout{Dir: dir}, Keep: 2}
	ctx := context.Background()
	clock := testNow
	s, _ := NewSealer(p, SealerOptions{Now: func() time.Time { clock = clock.Add(time.Second); return clock }})
	var paths []string
	for _, gen := range []uint64{5, 5, 6, 6, 6} {
		c := testContents(testState(10))
		c.Generation = gen
		b, err := s.Seal(ctx, c, key)
		if err != nil {
			t.Fatal(err)
		}
		path, err := w.Write(ctx, b)
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(path)
		if err != nil || string(got) != string(b) {
			t.Fatalf("read back %s: %v", path, err)
		}
		if _, err := w.Write(ctx, b); !errors.Is(err, ErrBundleExists) {
			t.Fatalf("second write of the same bundle: %v", err)
		}
		paths = append(paths, path)
	}
	// A foreign file and a crash's leftover are never touched.
	foreign := filepath.Join(w.Layout.VMDir(testVM), "notes.txt")
	leftover := filepath.Join(w.Layout.VMDir(testVM), "."+filepath.Base(paths[0])+".tmp-1")
	for _, f := range []string{foreign, leftover} {
		if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	list, err := w.Layout.List(testVM)
	if err != nil || len(list) != 5 || list[0].Path != paths[4] || list[4].Path != paths[0] {
		t.Fatalf("list: %v %v", list, err)
	}
	removed, err := w.Prune(ctx, testVM, 6)
	if err != nil || len(removed) != 3 {
		t.Fatalf("prune: %v %v", removed, err)
	}
	list, _ = w.Layout.List(testVM)
	if len(list) != 2 || list[0].Path != paths[4] || list[1].Path != paths[3] {
		t.Fatalf("after prune: %v", list)
	}
	for _, f := range []string{foreign, leftover} {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("%s was touched: %v", f, err)
		}
	}
	vms, err := w.Layout.VMs()
	if err != nil || len(vms) != 1 || vms[0] != testVM {
		t.Fatalf("VMs: %v %v", vms, err)
	}
	if l, err := (Layout{Dir: filepath.Join(dir, "none")}).List(testVM); err != nil || l != nil {
		t.Errorf("missing dir: %v %v", l, err)
	}
	if _, err := w.Write(ctx, []byte("not a bundle")); !errors.Is(err, ErrMalformed) {
		t.Errorf("garbage: %v", err)
	}
	if _, err := w.Prune(ctx, "../etc", 1); err == nil {
		t.Error("prune of a non-UUID accepted")
	}
	if _, err := (&Writer{}).Write(ctx, mustSealed(t)); !errors.Is(err, ErrBadRequest) {
		t.Errorf("no dir: %v", err)
	}
}

func mustSealed(t *testing.T) []byte {
	key, _ := knownKey(t)
	return seal(t, policyFor(t, 1, newCustodians(t, 1, false)), testContents(nil), key)
}
