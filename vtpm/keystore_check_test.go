package vtpm_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/vtpm"
)

func TestCheckKeysIsolatesDamagedEnvelopes(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	ks, _, dir := newKeyStore(t, "host-a")
	keys := filepath.Join(dir, "keys")
	vms := []string{
		"0e2e0e2e-0000-4000-8000-00000000c001", // ok
		"0e2e0e2e-0000-4000-8000-00000000c002", // truncated
		"0e2e0e2e-0000-4000-8000-00000000c003", // ciphertext bit flipped
		"0e2e0e2e-0000-4000-8000-00000000c004", // old envelope restored
		"0e2e0e2e-0000-4000-8000-00000000c005", // another VM's envelope copied over
		"0e2e0e2e-0000-4000-8000-00000000c006", // empty file
	}
	for _, vm := range vms {
		if _, _, err := ks.Create(ctx, vm); err != nil {
			t.Fatal(err)
		}
	}
	// Honest twin: every envelope checks ok.
	cs, err := ks.CheckKeys(ctx)
	if err != nil || len(cs) != len(vms) {
		t.Fatalf("CheckKeys: %d results, %v", len(cs), err)
	}
	for _, c := range cs {
		if c.Damaged {
			t.Fatalf("honest store: %s", c)
		}
	}
	k, _ := vtpm.NewVMKey(nil)
	if err := ks.PutPending(ctx, "0e2e0e2e-0000-4000-8000-00000000c007", "0123456789abcdef", 3, k); err != nil {
		t.Fatal(err)
	}

	path := func(vm string) string { return filepath.Join(keys, vm+".key") }
	read := func(vm string) []byte {
		b, err := os.ReadFile(path(vm))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	write := func(vm string, b []byte) {
		if err := os.WriteFile(path(vm), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(vms[1], read(vms[1])[:40])
	var env map[string]any
	if err := json.Unmarshal(read(vms[2]), &env); err != nil {
		t.Fatal(err)
	}
	ct := []byte(env["ct"].(string))
	// Another base64 letter: the envelope still parses, its ciphertext no
	// longer authenticates. (Flipping bits could make it invalid base64,
	// which the header check already catches: CI run of 46366db.)
	if ct[3] == 'A' {
		ct[3] = 'B'
	} else {
		ct[3] = 'A'
	}
	env["ct"] = string(ct)
	b, _ := json.Marshal(env)
	write(vms[2], b)
	old := read(vms[3])
	k2, _ := vtpm.NewVMKey(nil)
	if err := ks.Delete(ctx, vms[3]); err != nil {
		t.Fatal(err)
	}
	if err := ks.Put(ctx, vms[3], 2, k2); err != nil {
		t.Fatal(err)
	}
	write(vms[3], old)
	write(vms[4], read(vms[0]))
	write(vms[5], nil)

	// Today's List fails for every VM because of one damaged envelope.
	if _, err := ks.List(ctx); err == nil {
		t.Fatal("List over damaged envelopes succeeded; this test expects today's all-or-nothing List")
	}
	cs, err = ks.CheckKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]error{
		vms[0]: nil, vms[1]: vtpm.ErrCorrupt, vms[2]: vtpm.ErrCorrupt, vms[3]: vtpm.ErrStaleGeneration,
		vms[4]: vtpm.ErrWrongKey, vms[5]: vtpm.ErrCorrupt,
	}
	if len(cs) != len(vms)+1 {
		t.Fatalf("%d results, want %d", len(cs), len(vms)+1)
	}
	for _, c := range cs {
		t.Log(c)
		if c.Pending != "" {
			if c.Damaged || c.Generation != 3 {
				t.Errorf("pending key: %s", c)
			}
			continue
		}
		w := want[c.VMID]
		switch {
		case w == nil && c.Damaged:
			t.Errorf("%s: damaged, want ok", c)
		case w != nil && (!c.Damaged || !errors.Is(c.Err, w) || c.Reason == ""):
			t.Errorf("%s: want damaged with %v", c, w)
		case w != nil && !strings.Contains(c.String(), c.File):
			t.Errorf("%s does not name the file", c)
		}
	}
	f := vtpm.FactsFromChecks(cs)
	if len(f.Holdings) != 1 || f.Holdings[0].VMID != vms[0] || len(f.Damaged) != 5 {
		t.Fatalf("facts %+v", f)
	}
	// The usable VM still opens.
	if _, _, err := ks.Get(ctx, vms[0]); err != nil {
		t.Fatal(err)
	}
	// Facts from the headers alone: damaged headers are listed as damaged.
	hf, err := ks.Facts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(hf.Damaged) != 3 || len(hf.Holdings) != 3 {
		t.Fatalf("header facts %+v", hf)
	}
}

func TestCheckVaultFile(t *testing.T) {
	t.Parallel()
	_, _, dir := newKeyStore(t, "host-a")
	path := filepath.Join(dir, vtpm.VaultFileName)
	if err := vtpm.CheckVaultFile(dir); err != nil {
		t.Fatalf("honest vault file: %v", err)
	}
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(orig, &m); err != nil {
		t.Fatal(err)
	}
	edit := func(f func(map[string]any)) []byte {
		var c map[string]any
		_ = json.Unmarshal(orig, &c)
		f(c)
		b, _ := json.Marshal(c)
		return b
	}
	for _, tc := range []struct {
		name string
		data []byte // nil: remove the file
		want error
	}{
		{"missing", nil, vtpm.ErrVaultNotInitialized},
		{"empty", []byte{}, vtpm.ErrCorrupt},
		{"truncated", orig[:len(orig)/3], vtpm.ErrCorrupt},
		{"future version", edit(func(c map[string]any) { c["version"] = 7 }), vtpm.ErrUnsupportedVersion},
		{"slot public cut", edit(func(c map[string]any) {
			s := c["slots"].([]any)[0].(map[string]any)
			s["public"] = "AAQ="
		}), vtpm.ErrCorrupt},
		{"no PCR value", edit(func(c map[string]any) {
			s := c["slots"].([]any)[0].(map[string]any)
			s["pcr_values"] = map[string]any{}
		}), vtpm.ErrCorrupt},
		{"no slots", edit(func(c map[string]any) { c["slots"] = []any{} }), vtpm.ErrCorrupt},
	} {
		_ = os.Remove(path)
		if tc.data != nil {
			if err := os.WriteFile(path, tc.data, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		err := vtpm.CheckVaultFile(dir)
		var ve *vtpm.VaultFileError
		if !errors.Is(err, tc.want) || !errors.As(err, &ve) || ve.Path != path {
			t.Errorf("%s: %v, want %v naming %s", tc.name, err, tc.want, path)
			continue
		}
		t.Logf("%s: %v", tc.name, err)
	}
}
