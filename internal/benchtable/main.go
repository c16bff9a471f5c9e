// Command benchtable turns 'go test -bench' output into the table that
// 'make bench' prints: one row per benchmark, with host TPM commands per
// operation, wall time per operation (with the profile's latency really
// injected) and the modelled discrete-TPM time.
package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "benchtable:", err)
		os.Exit(1)
	}
}

type row struct {
	name, profile string
	metrics       map[string]float64
}

// parse reads benchmark result lines; other lines are passed over, except
// FAIL lines, which make the run fail.
func parse(r io.Reader) ([]row, error) {
	var rows []row
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "FAIL") || strings.HasPrefix(line, "--- FAIL") {
			return nil, fmt.Errorf("benchmark failed: %s", line)
		}
		f := strings.Fields(line)
		if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") {
			continue
		}
		name := strings.TrimPrefix(f[0], "Benchmark")
		if i := strings.LastIndex(name, "-"); i > 0 {
			name = name[:i] // GOMAXPROCS suffix
		}
		rw := row{name: name, profile: "-", metrics: map[string]float64{}}
		if base, prof, ok := strings.Cut(name, "/profile="); ok {
			rw.name, rw.profile = base, prof
		}
		for i := 2; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err == nil {
				rw.metrics[f[i+1]] = v
			}
		}
		rows = append(rows, rw)
	}
	return rows, sc.Err()
}

func run(in io.Reader, out io.Writer) error {
	rows, err := parse(in)
	if err != nil {
		return err
	}
	if len(rows) == 0 {
		return fmt.Errorf("no benchmark results on stdin")
	}
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "operation\tprofile\thost TPM cmds/op\tround trips/op\twall time/op\tmodelled dtpm/op\t")
	num := func(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }
	for _, r := range rows {
		cmds, dtpm, rt := "-", "-", "-"
		if v, ok := r.metrics["tpm-cmds/op"]; ok {
			cmds = num(v)
		} else if d, ok := r.metrics["dst-tpm-cmds/op"]; ok {
			cmds = fmt.Sprintf("src %s, dst %s", num(r.metrics["src-tpm-cmds/op"]), num(d))
		}
		if v, ok := r.metrics["round-trips/op"]; ok {
			rt = num(v)
		}
		if v, ok := r.metrics["dtpm-ms/op"]; ok {
			dtpm = fmt.Sprintf("%.0f ms", v)
		}
		wall := time.Duration(r.metrics["ns/op"]).Round(10 * time.Microsecond).String()
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t\n", r.name, r.profile, cmds, rt, wall, dtpm)
	}
	return w.Flush()
}
