// Package metrics exports vtpmd's Prometheus metrics. Each Metrics has its
// own prometheus.Registry (the global default registry is never used), so
// several agents can run in one process, as tests do.
//
// Series:
//
//	vtpmm_migrations_total{result}            counter: committed, aborted, refused, failed
//	vtpmm_migration_phase_seconds{phase}      histogram: attest, wrap, prepare, hypervisor, commit
//	vtpmm_tpm_commands_total{command}         counter read from the TPM meter at scrape time
//	vtpmm_attestation_refusals_total{rule}    counter
//	vtpmm_vtpms{state}                        gauge: active, pending
//
// plus the standard go_* and process_* collectors. Label values are taken
// as given: pass the constants of this package (and attestation rule
// names, a small fixed set) to keep the cardinality bounded.
package metrics
