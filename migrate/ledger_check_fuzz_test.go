package migrate

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzLedgerWalk feeds arbitrary bytes to the ledger check's structure
// walk and record check: they must never panic (CheckLedger recovers, but
// a panic here is a bug), whatever the file holds.
func FuzzLedgerWalk(f *testing.F) {
	path := filepath.Join(f.TempDir(), "ledger.db")
	l, err := OpenLedger(path, nil)
	if err != nil {
		f.Fatal(err)
	}
	if err := l.Begin(Tx{ID: "00000000000000a1", Role: RoleSource, Peer: "host-b", State: SrcBegun,
		VMs: []TxVM{{UUID: "0e2e0e2e-0000-4000-8000-000000000001", Generation: 2}}}); err != nil {
		f.Fatal(err)
	}
	l.Close()
	seed, err := os.ReadFile(path)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	f.Add(seed[:len(seed)/2])
	f.Add(make([]byte, 8192))
	f.Fuzz(func(t *testing.T, b []byte) {
		w, _, err := walkLedger(b)
		if err == nil {
			_, _, _ = checkRecords(w.top)
		}
	})
}
