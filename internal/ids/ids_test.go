package ids

import (
	"strings"
	"testing"
)

func TestIDs(t *testing.T) {
	for s, want := range map[string]bool{
		"6f1c3a52-0c41-4d1c-9d55-3f1e7c2b9a10":  true,
		"6F1C3A52-0C41-4D1C-9D55-3F1E7C2B9A10":  false,
		"6f1c3a52-0c41-4d1c-9d55-3f1e7c2b9a1":   false,
		"6f1c3a52-0c41-4d1c-9d55-3f1e7c2b9a10 ": false,
		"":                                      false,
	} {
		if IsUUID(s) != want {
			t.Errorf("IsUUID(%q) != %v", s, want)
		}
	}
	for s, want := range map[string]bool{
		"host-a": true, "h": true, "a.b_c-1": true, strings.Repeat("a", 63): true,
		strings.Repeat("a", 64): false, "-a": false, "a/b": false, "a b": false, "": false,
	} {
		if IsHostID(s) != want {
			t.Errorf("IsHostID(%q) != %v", s, want)
		}
	}
	seen := map[string]bool{}
	for range 100 {
		u, err := NewUUID(nil)
		if err != nil || !IsUUID(u) || u[14] != '4' || seen[u] {
			t.Fatalf("NewUUID: %q %v", u, err)
		}
		seen[u] = true
	}
	if _, err := NewUUID(strings.NewReader("short")); err == nil {
		t.Fatal("NewUUID from a short reader succeeded")
	}
}
