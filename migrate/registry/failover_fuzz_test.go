package registry_test

import (
	"testing"

	"github.com/vtpmm/vtpmm/migrate/registry"
)

// FuzzDecodeFence: fence records are written by any host's etcd user
// (the standby/ prefix) and read by every start rule.
func FuzzDecodeFence(f *testing.F) {
	fuzzRoundTrip(f, []string{
		`{"v":1,"host":"host-a","by":"host-b","at":"2026-12-07T01:00:00Z"}`,
		`{"v":1,"host":"host-a","by":"","at":"2026-12-07T01:00:00Z"}`,
		`{"v":2,"host":"host-a","by":"host-b","at":"2026-12-07T01:00:00Z"}`,
	}, registry.DecodeFence)
}
