// Package evacuate owns host evacuation before maintenance: the plan (a
// trusted destination with room for every VM running on the source), its
// batches (one per source and destination pair, so one attestation and one
// transfer key per pair however many VMs), the runner that marks the source
// draining, claims each batch's VMs in the registry, hands the batches to a
// Mover that runs at most N hypervisor migrations at once, re-plans the VMs
// of a destination that is refused or fails, and resumes an interrupted
// evacuation without moving any VM twice; the evacuation record (one
// versioned JSON record per source host in the registry); the progress
// events with their renderers (in-place lines on a terminal, plain lines,
// NDJSON); and the report with its exit codes.
//
// It owns no key, no TPM and no hypervisor: the registry, the source's
// hypervisor, the destinations' capacity and the mover (migrate.Node in
// vtpmd) are small interfaces defined here, where they are consumed, with
// working fakes in package evacuate/fake that follow the real components'
// rules. See docs/evacuation.md.
package evacuate
