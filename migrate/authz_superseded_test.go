package migrate

import "testing"

// TestSupersededBy: only a restore, only with a registry, and only over a
// copy the registry's record (offered-1) is above replaces an active key.
func TestSupersededBy(t *testing.T) {
	for _, tc := range []struct {
		call          string
		registry      bool
		held, offered uint64
		want          bool
	}{
		{"restore", true, 1, 3, true},   // the registry at 2 superseded the copy at 1
		{"restore", true, 2, 3, false},  // the copy is the registry's generation: the owner's
		{"restore", true, 3, 3, false},  // a copy at the offered generation
		{"restore", true, 5, 3, false},  // a newer copy than the registry's
		{"restore", false, 1, 3, false}, // no registry to say it is stale
		{"prepare", true, 1, 3, false},  // a migration never replaces an active key
	} {
		if got := supersededBy(tc.call, tc.registry, tc.held, tc.offered); got != tc.want {
			t.Errorf("supersededBy(%q, registry %v, held %d, offered %d) = %v, want %v", tc.call, tc.registry, tc.held, tc.offered, got, tc.want)
		}
	}
}
