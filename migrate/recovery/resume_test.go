package recovery

import (
	"bytes"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/registry"
)

// TestIsRestoreTx: a restore's transaction ID is recognised for its VM,
// destination and generation only; a migration's (random) ID never is.
func TestIsRestoreTx(t *testing.T) {
	const vm, dest = "0b7c1f2e-5b1a-4f7e-9a53-111111111111", "host-a"
	id, err := newRestoreTxID(bytes.NewReader(bytes.Repeat([]byte{7}, 8)), vm, dest, 3)
	if err != nil {
		t.Fatal(err)
	}
	if len(id) != 32 {
		t.Fatalf("restore tx ID %q: %d hex digits, want 32 (a migration's length)", id, len(id))
	}
	for _, tc := range []struct {
		name string
		tx   registry.OpenTx
		vm   string
		gen  uint64
		want bool
	}{
		{"the restore", registry.OpenTx{ID: id, To: dest}, vm, 3, true},
		{"another destination", registry.OpenTx{ID: id, To: "host-b"}, vm, 3, false},
		{"another generation", registry.OpenTx{ID: id, To: dest}, vm, 4, false},
		{"another VM", registry.OpenTx{ID: id, To: dest}, "0b7c1f2e-5b1a-4f7e-9a53-222222222222", 3, false},
		{"a migration", registry.OpenTx{ID: "00112233445566778899aabbccddeeff", To: dest}, vm, 3, false},
		{"a short ID", registry.OpenTx{ID: id[:16], To: dest}, vm, 3, false},
	} {
		if got := isRestoreTx(tc.tx, tc.vm, tc.gen); got != tc.want {
			t.Errorf("%s: isRestoreTx = %v, want %v", tc.name, got, tc.want)
		}
	}
}
