package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestTable(t *testing.T) {
	in := `goos: linux
BenchmarkOpenVault/profile=dtpm-2   3  400123456 ns/op  350 dtpm-ms/op  7.000 tpm-cmds/op
BenchmarkMigrateWarm-2               4    24798149 ns/op   4.000 dst-tpm-cmds/op   350.0 dtpm-ms/op   2.000 round-trips/op   0 src-tpm-cmds/op
BenchmarkVerify-2                  100     1300000 ns/op
PASS
`
	var out bytes.Buffer
	if err := run(strings.NewReader(in), &out); err != nil {
		t.Fatal(err)
	}
	got := out.String()
	for _, want := range []string{"OpenVault", "dtpm", "7", "400.12ms", "350 ms", "Verify", "1.3ms", "src 0, dst 4"} {
		if !strings.Contains(got, want) {
			t.Errorf("table lacks %q:\n%s", want, got)
		}
	}
	if err := run(strings.NewReader("--- FAIL: BenchmarkX\n"), &out); err == nil {
		t.Error("a failed benchmark run must fail the table")
	}
	if err := run(strings.NewReader("PASS\n"), &out); err == nil {
		t.Error("no results must be an error")
	}
}
