package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// FailoverMetrics are the standby replicas' and failovers' collectors
// (issue 15): registered in the Metrics' registry on first use.
type FailoverMetrics struct {
	lag        *prometheus.GaugeVec
	refreshes  *prometheus.CounterVec
	failovers  *prometheus.CounterVec
	promotions prometheus.Counter
	phases     *prometheus.HistogramVec
}

// Failover returns m's failover collectors, registering them once.
func (m *Metrics) Failover() *FailoverMetrics {
	m.failoverOnce.Do(func() { m.failover = newFailover(m.reg) })
	return m.failover
}

func newFailover(reg *prometheus.Registry) *FailoverMetrics {
	f := &FailoverMetrics{
		lag: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "vtpmm_replica_lag_seconds",
			Help: "How long a standby's replica has been behind the VM's state (0: current), per VM and standby, on the owner.",
		}, []string{"vm", "standby"}),
		refreshes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vtpmm_replica_refreshes_total",
			Help: "Standby replica refreshes sent by this host, by result (sent, refused, failed).",
		}, []string{"result"}),
		failovers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vtpmm_failovers_total",
			Help: "Failover attempts on this host, by result (promoted, lost, refused, failed).",
		}, []string{"result"}),
		promotions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vtpmm_promotions_total",
			Help: "Replicas this host promoted (it became the VM's owner).",
		}),
		phases: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vtpmm_failover_phase_seconds",
			Help:    "Duration of failover phases (fence, promote, start).",
			Buckets: PhaseBuckets(),
		}, []string{"phase"}),
	}
	reg.MustRegister(f.lag, f.refreshes, f.failovers, f.promotions, f.phases)
	for _, r := range []string{"sent", "refused", "failed"} {
		f.refreshes.WithLabelValues(r)
	}
	for _, r := range []string{"promoted", "lost", "refused", "failed"} {
		f.failovers.WithLabelValues(r)
	}
	return f
}

// SetLag records a replica's lag.
func (f *FailoverMetrics) SetLag(vm, standby string, d time.Duration) {
	f.lag.WithLabelValues(vm, standby).Set(d.Seconds())
}

// Refreshed counts a refresh by result.
func (f *FailoverMetrics) Refreshed(result string) { f.refreshes.WithLabelValues(result).Inc() }

// FailoverDone counts a failover attempt by result; a promotion also
// counts in vtpmm_promotions_total.
func (f *FailoverMetrics) FailoverDone(result string) {
	f.failovers.WithLabelValues(result).Inc()
	if result == "promoted" {
		f.promotions.Inc()
	}
}

// ObserveFailover records a failover phase's duration.
func (f *FailoverMetrics) ObserveFailover(phase string, d time.Duration) {
	f.phases.WithLabelValues(phase).Observe(d.Seconds())
}
