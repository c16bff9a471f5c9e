package metrics

import (
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Migration results (label result of vtpmm_migrations_total).
const (
	ResultCommitted = "committed"
	ResultAborted   = "aborted"
	ResultRefused   = "refused"
	ResultFailed    = "failed"
)

// Migration phases (label phase of vtpmm_migration_phase_seconds).
const (
	PhaseAttest     = "attest"
	PhaseWrap       = "wrap"
	PhasePrepare    = "prepare"
	PhaseHypervisor = "hypervisor"
	PhaseCommit     = "commit"
)

// vTPM states (label state of vtpmm_vtpms).
const (
	StateActive  = "active"
	StatePending = "pending"
)

// PhaseBuckets returns the histogram buckets in seconds: from a warm
// attestation (tens of milliseconds) to a long live migration (minutes).
func PhaseBuckets() []float64 {
	return []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}
}

// Metrics holds vtpmd's collectors and their registry. It is safe for
// concurrent use.
type Metrics struct {
	reg        *prometheus.Registry
	migrations *prometheus.CounterVec
	phases     *prometheus.HistogramVec
	refusals   *prometheus.CounterVec
	vtpms      *prometheus.GaugeVec
	tpm        *tpmCollector

	failoverOnce sync.Once
	failover     *FailoverMetrics // failover.go
}

// New creates the collectors and registers them in a new registry. The
// known label values start at zero so that every series exists from the
// first scrape.
func New() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		migrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vtpmm_migrations_total",
			Help: "vTPM migrations by result (committed, aborted, refused, failed).",
		}, []string{"result"}),
		phases: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vtpmm_migration_phase_seconds",
			Help:    "Duration of migration phases (attest, wrap, prepare, hypervisor, commit).",
			Buckets: PhaseBuckets(),
		}, []string{"phase"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vtpmm_attestation_refusals_total",
			Help: "Attestations refused, by the policy rule that failed.",
		}, []string{"rule"}),
		vtpms: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "vtpmm_vtpms",
			Help: "vTPMs on this host by state (active, pending).",
		}, []string{"state"}),
		tpm: &tpmCollector{desc: prometheus.NewDesc(
			"vtpmm_tpm_commands_total",
			"Commands sent to the host TPM, by command name.",
			[]string{"command"}, nil)},
	}
	m.reg.MustRegister(m.migrations, m.phases, m.refusals, m.vtpms, m.tpm,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, r := range []string{ResultCommitted, ResultAborted, ResultRefused, ResultFailed} {
		m.migrations.WithLabelValues(r)
	}
	for _, p := range []string{PhaseAttest, PhaseWrap, PhasePrepare, PhaseHypervisor, PhaseCommit} {
		m.phases.WithLabelValues(p)
	}
	m.SetVTPMs(0, 0)
	return m
}

// Registry returns the registry, for registering more collectors.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// MigrationDone counts one finished migration with its result.
func (m *Metrics) MigrationDone(result string) { m.migrations.WithLabelValues(result).Inc() }

// ObservePhase records how long one migration phase took.
func (m *Metrics) ObservePhase(phase string, d time.Duration) {
	m.phases.WithLabelValues(phase).Observe(d.Seconds())
}

// AttestationRefused counts one refused attestation by rule name.
func (m *Metrics) AttestationRefused(rule string) { m.refusals.WithLabelValues(rule).Inc() }

// SetVTPMs sets the number of active and pending vTPMs.
func (m *Metrics) SetVTPMs(active, pending int) {
	m.vtpms.WithLabelValues(StateActive).Set(float64(active))
	m.vtpms.WithLabelValues(StatePending).Set(float64(pending))
}

// SetTPMCounter sets the function read at every scrape for
// vtpmm_tpm_commands_total: it returns the cumulative command counts by
// command name (vtpmd passes a closure over its TPM meter). Counts are
// read, never copied, so nothing is counted twice; if the meter is reset
// the counter drops, which Prometheus treats as a counter reset. nil
// removes the series.
func (m *Metrics) SetTPMCounter(f func() map[string]int) {
	m.tpm.mu.Lock()
	defer m.tpm.mu.Unlock()
	m.tpm.counts = f
}

// Handler serves the exposition format of this registry only.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// tpmCollector reads the TPM command counts at scrape time.
type tpmCollector struct {
	desc   *prometheus.Desc
	mu     sync.Mutex
	counts func() map[string]int
}

func (c *tpmCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *tpmCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	f := c.counts
	c.mu.Unlock()
	if f == nil {
		return
	}
	for name, n := range f() {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.CounterValue, float64(n), name)
	}
}
