package devfleet

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/internal/pki"
)

// GoldenPCRs are the PCRs the fleet's golden policy checks.
var GoldenPCRs = []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}

// Provision prepares what an operator prepares before the first daemon
// starts, below root: the agents' PKI (a CA and a certificate per host, as
// vtpmctl pki init/issue make them) and a golden attestation policy from
// the event log of the fleet's trusted boot (vtpmctl eventlog golden).
func Provision(root string, hosts []string, goldenLog string) (Config, error) {
	pkiDir := filepath.Join(root, "pki")
	ca, err := pki.InitCA(pkiDir, pki.CAOptions{})
	if err != nil {
		return Config{}, fmt.Errorf("provision: %w", err)
	}
	for _, h := range hosts {
		if _, _, err := ca.IssueToDir(h, pkiDir, pki.IssueOptions{}); err != nil {
			return Config{}, fmt.Errorf("provision %s: %w", h, err)
		}
	}
	b, err := os.ReadFile(goldenLog)
	if err != nil {
		return Config{}, fmt.Errorf("provision: %w", err)
	}
	l, err := attest.ParseEventLog(b)
	if err != nil {
		return Config{}, fmt.Errorf("provision: %w", err)
	}
	p, err := attest.GoldenFromEventLog(l, "sha256", GoldenPCRs)
	if err != nil {
		return Config{}, fmt.Errorf("provision: %w", err)
	}
	pol, err := p.Marshal()
	if err != nil {
		return Config{}, err
	}
	policy := filepath.Join(root, "policy.yaml")
	if err := os.WriteFile(policy, pol, 0o600); err != nil {
		return Config{}, err
	}
	return Config{Root: root, PKIDir: pkiDir, PolicyFile: policy}, nil
}
