package daemon

import (
	"testing"

	"github.com/vtpmm/vtpmm/hypervisor"
)

// The events libvirt 9.0 sends around a live migration (recorded by
// test/e2e TestLibvirtLifecycleEvents) and a few others.
func TestSettlesOn(t *testing.T) {
	for _, tc := range []struct {
		event  hypervisor.EventType
		detail hypervisor.EventDetail
		want   bool
	}{
		{"suspended", "migrated", false}, // source, before the switch-over
		{"stopped", "migrated", true},    // source, after it
		{"started", "migrated", true},    // destination, incoming
		{"resumed", "migrated", true},    // destination, switched over
		{"defined", "added", false},      // destination, persistent copy
		{"stopped", "destroyed", true},
		{"stopped", "failed", true},
		{"started", "booted", false},
		{"resumed", "unpaused", false},
	} {
		if got := settlesOn(hypervisor.LifecycleEvent{Event: tc.event, Detail: tc.detail}); got != tc.want {
			t.Errorf("settlesOn(%s/%s) = %v, want %v", tc.event, tc.detail, got, tc.want)
		}
	}
}
