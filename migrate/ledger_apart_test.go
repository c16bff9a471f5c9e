package migrate_test

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/vtpmm/vtpmm/migrate"
)

// TestLedgerApartRecords: the ledger keeps one apart record per VM,
// oldest first, replaced and cleared by VM; CheckLedger names a damaged one.
func TestLedgerApartRecords(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "ledger.db")
	clock := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	l, err := migrate.OpenLedger(path, func() time.Time { clock = clock.Add(time.Second); return clock })
	if err != nil {
		t.Fatal(err)
	}
	vm1, vm2 := "0e2e0e2e-0000-4000-8000-000000000001", "0e2e0e2e-0000-4000-8000-000000000002"
	tx := strings.Repeat("ab", 16)
	for _, a := range []migrate.Apart{{VM: vm2, Host: "host-b", Tx: tx}, {VM: vm1, Host: "host-c", Tx: tx}, {VM: vm2, Host: "host-c", Tx: tx}} {
		if err := l.MarkApart(a); err != nil {
			t.Fatal(err)
		}
	}
	got, err := l.Aparts()
	if err != nil || len(got) != 2 || got[0].VM != vm1 || got[1].VM != vm2 || got[1].Host != "host-c" {
		t.Fatalf("Aparts: %+v, %v", got, err)
	}
	if err := l.ClearApart(vm1); err != nil {
		t.Fatal(err)
	}
	if err := l.ClearApart(vm1); err != nil { // again: nothing to clear
		t.Fatal(err)
	}
	if got, _ := l.Aparts(); len(got) != 1 || got[0].VM != vm2 {
		t.Fatalf("after clearing %s: %+v", vm1, got)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := migrate.CheckLedger(path, migrate.LedgerCheckOptions{}); err != nil {
		t.Fatalf("intact ledger with an apart record: %v", err)
	}
	for _, tc := range []struct{ name, key, value string }{
		{"not JSON", vm1, "{"},
		{"another VM", vm1, `{"vm":"` + vm2 + `","host":"host-b","tx":"` + tx + `","since":"2026-12-07T12:00:00Z"}`},
		{"bad host", vm1, `{"vm":"` + vm1 + `","host":"../x","tx":"` + tx + `","since":"2026-12-07T12:00:00Z"}`},
		{"unknown field", vm1, `{"vm":"` + vm1 + `","host":"host-b","tx":"` + tx + `","key":"00"}`},
	} {
		db, err := bolt.Open(path, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		err = db.Update(func(t *bolt.Tx) error { return t.Bucket([]byte("apart")).Put([]byte(tc.key), []byte(tc.value)) })
		db.Close()
		if err != nil {
			t.Fatal(err)
		}
		_, err = migrate.CheckLedger(path, migrate.LedgerCheckOptions{})
		wantDamaged(t, tc.name, path, err)
		if !strings.Contains(err.Error(), "apart record") {
			t.Errorf("%s: %v does not name the apart record", tc.name, err)
		}
		t.Logf("%s: %v", tc.name, err)
	}
}
