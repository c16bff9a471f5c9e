package evacuate

import (
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/vtpm"
)

// The host TPM commands of one batch, as migrate measures them
// (BenchmarkMigrateWarm / BenchmarkMigrateCold, docs/protocol.md). The
// source runs none: its vault key is already in memory.
var (
	// UnwrapCommands: the destination unwraps the batch's transfer key.
	UnwrapCommands = []tpm2.TPMCC{tpm2.TPMCCImport, tpm2.TPMCCLoad, tpm2.TPMCCUnseal, tpm2.TPMCCFlushContext}
	// EvidenceCommands: a destination without fresh evidence certifies its
	// migration key and quotes its PCRs (two PCR_Read for the policy's PCRs).
	EvidenceCommands = []tpm2.TPMCC{tpm2.TPMCCCertify, tpm2.TPMCCQuote, tpm2.TPMCCPCRRead, tpm2.TPMCCPCRRead}
)

// TPMModel is the modelled host TPM cost of an evacuation.
type TPMModel struct {
	Batches  int           // destination batches (one per pair, plus follow-ups)
	Cold     int           // of which needed fresh evidence
	Commands int           // host TPM commands in all (all on destinations)
	Time     time.Duration // modelled under the profile
}

// ModelTPM models the host TPM time of batches destination batches, cold
// of which need fresh evidence, under profile p (e.g. vtpm.ProfileDTPM).
// Destinations are separate TPMs, so the sum is TPM time, not wall time.
func ModelTPM(p vtpm.Profile, batches, cold int) TPMModel {
	m := TPMModel{Batches: batches, Cold: cold}
	for _, cc := range UnwrapCommands {
		m.Commands += batches
		m.Time += time.Duration(batches) * p.Latency(cc)
	}
	for _, cc := range EvidenceCommands {
		m.Commands += cold
		m.Time += time.Duration(cold) * p.Latency(cc)
	}
	return m
}
