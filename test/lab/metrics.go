package lab

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// MetricsPort is the port EnableMetrics has a host's vtpmd serve its
// Prometheus metrics on (on the host's IP, inside its network namespace).
const MetricsPort = 9450

// EnableMetrics adds 'metrics_listen: IP:MetricsPort' to the host's
// vtpmd.yaml; the daemon must not be running yet (it reads its
// configuration at start).
func (v *Vtpmd) EnableMetrics() error {
	if v.Running() {
		return fmt.Errorf("%w: vtpmd on %s already runs; enable metrics before Start", ErrVtpmd, v.Host.Name)
	}
	fh, err := os.OpenFile(v.ConfigPath, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(fh, "metrics_listen: %s\n", v.metricsAddr())
	if cerr := fh.Close(); err == nil {
		err = cerr
	}
	return err
}

func (v *Vtpmd) metricsAddr() string {
	return net.JoinHostPort(v.Host.IP, strconv.Itoa(MetricsPort))
}

// Metrics is one scrape of a vtpmd's metrics: every sample's value by its
// series ("name" or "name{label=\"value\",...}", as exposed).
type Metrics map[string]float64

// Metrics scrapes the host's vtpmd (EnableMetrics) with curl inside the
// host's network namespace.
func (v *Vtpmd) Metrics(ctx context.Context) (Metrics, error) {
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cmd, err := v.Host.NsCommand(rctx, "curl", "-sS", "--max-time", "5", "http://"+v.metricsAddr()+"/metrics")
	if err != nil {
		return nil, err
	}
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%w: scrape the metrics of vtpmd on %s: %v", ErrVtpmd, v.Host.Name, err)
	}
	return ParseMetrics(string(out))
}

// ParseMetrics reads Prometheus' text exposition format (comments
// skipped, no timestamps expected).
func ParseMetrics(text string) (Metrics, error) {
	m := Metrics{}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		if i < 0 {
			return nil, fmt.Errorf("metrics line %q: no value", l)
		}
		val, err := strconv.ParseFloat(l[i+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("metrics line %q: %w", l, err)
		}
		m[strings.TrimSpace(l[:i])] = val
	}
	return m, sc.Err()
}

// Family returns the samples of one metric by the value of one label
// (e.g. Family("vtpmm_tpm_commands_total", "command")); samples without
// that label are skipped.
func (m Metrics) Family(name, label string) map[string]float64 {
	out := map[string]float64{}
	prefix := name + "{"
	for series, v := range m {
		labels, ok := strings.CutPrefix(series, prefix)
		if !ok {
			continue
		}
		for _, kv := range strings.Split(strings.TrimSuffix(labels, "}"), ",") {
			k, val, ok := strings.Cut(kv, "=")
			if ok && k == label {
				out[strings.Trim(val, `"`)] += v
			}
		}
	}
	return out
}

// TPMCommands is vtpmm_tpm_commands_total by command name.
func (m Metrics) TPMCommands() map[string]int {
	out := map[string]int{}
	for name, v := range m.Family("vtpmm_tpm_commands_total", "command") {
		out[name] = int(v)
	}
	return out
}

// SetEvidenceMaxAge rewrites attestation.evidence_max_age in the host's
// vtpmd.yaml (NewVtpmd writes it; default 60s); the daemon must not be
// running yet.
func (v *Vtpmd) SetEvidenceMaxAge(age time.Duration) error {
	if v.Running() {
		return fmt.Errorf("%w: vtpmd on %s already runs; set evidence_max_age before Start", ErrVtpmd, v.Host.Name)
	}
	b, err := os.ReadFile(v.ConfigPath)
	if err != nil {
		return err
	}
	lines := strings.Split(string(b), "\n")
	found := false
	for i, l := range lines {
		if strings.HasPrefix(l, "  evidence_max_age: ") {
			lines[i], found = "  evidence_max_age: "+age.String(), true
		}
	}
	if !found {
		return fmt.Errorf("%w: no evidence_max_age in %s", ErrVtpmd, v.ConfigPath)
	}
	return os.WriteFile(v.ConfigPath, []byte(strings.Join(lines, "\n")), 0o600)
}
