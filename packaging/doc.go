// Package packaging holds vtpmd's systemd unit (vtpmd.service) and its
// commented sample configuration (vtpmd.yaml), embedded for installers.
// Its tests check that the unit runs a real vtpmd command line with the
// hardening that keeps the TPM and libvirt reachable, and that the sample
// covers every configuration field and loads with agent.LoadConfig.
package packaging

import _ "embed"

//go:embed vtpmd.service
var unit string

//go:embed vtpmd.yaml
var sampleConfig string

// Unit returns packaging/vtpmd.service.
func Unit() string { return unit }

// SampleConfig returns packaging/vtpmd.yaml.
func SampleConfig() string { return sampleConfig }
