package migrate_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/migrate"
)

// goldenLedger writes a real ledger with OpenLedger: 150 transactions over
// many pages (a branch page above the leaves), some open, some final.
func goldenLedger(t *testing.T) (string, []migrate.Tx) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ledger.db")
	clock := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	l, err := migrate.OpenLedger(path, func() time.Time { clock = clock.Add(time.Second); return clock })
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 150; i++ {
		tx := migrate.Tx{ID: fmt.Sprintf("%016x", 0xa000+i), Role: migrate.RoleSource, Peer: "host-b", State: migrate.SrcBegun}
		if i%3 == 1 {
			tx.Role, tx.State, tx.Peer = migrate.RoleDestination, migrate.DstPending, "host-c"
		}
		for j := 0; j < 3; j++ {
			tx.VMs = append(tx.VMs, migrate.TxVM{UUID: fmt.Sprintf("0e2e0e2e-0000-4000-8000-%012x", i*3+j), Name: fmt.Sprintf("vm-%d-%d", i, j), Generation: uint64(i + 2)})
		}
		if err := l.Begin(tx); err != nil {
			t.Fatal(err)
		}
		if i%4 != 0 { // three in four end: the VM index keeps the others
			final := migrate.SrcCommitted
			if tx.Role == migrate.RoleDestination {
				final = migrate.DstCommitted
			}
			if _, err := l.SetState(tx.ID, final, ""); err != nil {
				t.Fatal(err)
			}
		}
	}
	all, err := l.All()
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return path, all
}

func writeVariant(t *testing.T, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// openAndRead is what vtpmd does after the check passes: OpenLedger (which
// commits a write transaction) and read everything.
func openAndRead(t *testing.T, path string) []migrate.Tx {
	t.Helper()
	l, err := migrate.OpenLedger(path, nil)
	if err != nil {
		t.Fatalf("OpenLedger after a passing check: %v", err)
	}
	defer l.Close()
	all, err := l.All()
	if err != nil {
		t.Fatalf("All after a passing check: %v", err)
	}
	return all
}

func wantDamaged(t *testing.T, name, path string, err error) {
	t.Helper()
	var le *migrate.LedgerError
	if !errors.Is(err, migrate.ErrLedgerDamaged) || !errors.As(err, &le) || le.Path != path || le.Problem == "" || le.Fix == "" {
		t.Fatalf("%s: CheckLedger = %v, want a *LedgerError (ErrLedgerDamaged) naming %s", name, err, path)
	}
}

func TestCheckLedgerHonestAndHistory(t *testing.T) {
	t.Parallel()
	path, all := goldenLedger(t)
	rep, err := migrate.CheckLedger(path, migrate.LedgerCheckOptions{HadHistory: true})
	if err != nil {
		t.Fatalf("intact ledger: %v", err)
	}
	t.Logf("intact: %+v", *rep)
	if rep.Transactions != len(all) || rep.Open != 38 || rep.Pages < 10 {
		t.Fatalf("report %+v", *rep)
	}
	if got := openAndRead(t, path); !reflect.DeepEqual(got, all) {
		t.Fatal("intact ledger reads differently")
	}

	dir := t.TempDir()
	missing := filepath.Join(dir, "none.db")
	empty := writeVariant(t, dir, "empty.db", nil)
	for _, p := range []string{missing, empty} {
		if rep, err := migrate.CheckLedger(p, migrate.LedgerCheckOptions{}); err != nil || !rep.Missing {
			t.Fatalf("%s on a new host: %+v, %v", p, rep, err)
		}
		_, err := migrate.CheckLedger(p, migrate.LedgerCheckOptions{HadHistory: true})
		var le *migrate.LedgerError
		if !errors.Is(err, migrate.ErrLedgerHistoryLost) || !errors.As(err, &le) || le.Path != p {
			t.Fatalf("%s with history: %v, want ErrLedgerHistoryLost", p, err)
		}
		t.Logf("history lost: %v", err)
	}
	// A fresh, transaction-less ledger (what vtpmd re-creates today).
	fresh := filepath.Join(dir, "fresh.db")
	l, err := migrate.OpenLedger(fresh, nil)
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	if _, err := migrate.CheckLedger(fresh, migrate.LedgerCheckOptions{}); err != nil {
		t.Fatalf("fresh ledger on a new host: %v", err)
	}
	if _, err := migrate.CheckLedger(fresh, migrate.LedgerCheckOptions{HadHistory: true}); !errors.Is(err, migrate.ErrLedgerHistoryLost) {
		t.Fatalf("fresh ledger with history: %v", err)
	}
}

func TestCheckLedgerDamage(t *testing.T) {
	t.Parallel()
	path, all := goldenLedger(t)
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lay, err := migrate.LayoutOfLedger(path)
	if err != nil {
		t.Fatal(err)
	}
	ps := lay.PageSize
	used := int(lay.Pages) * ps
	t.Logf("golden ledger: %d bytes, %d pages of %d, freelist page %d with %d free pages, %d tree pages",
		len(orig), lay.Pages, ps, lay.Freelist, len(lay.FreeIDs), len(lay.TreePages))
	dir := t.TempDir()
	check := func(name string, data []byte) (passed bool, intact bool) {
		t.Helper()
		p := writeVariant(t, dir, strings.NewReplacer("/", "_", " ", "_").Replace(name)+".db", data)
		_, err := migrate.CheckLedger(p, migrate.LedgerCheckOptions{HadHistory: true})
		if err != nil {
			wantDamaged(t, name, p, err)
			return false, false
		}
		return true, reflect.DeepEqual(openAndRead(t, p), all)
	}

	// Zeroed meta pages.
	for _, tc := range []struct {
		name  string
		pages []int
	}{{"meta 0 zeroed", []int{0}}, {"meta 1 zeroed", []int{1}}, {"both metas zeroed", []int{0, 1}}} {
		d := append([]byte(nil), orig...)
		for _, pg := range tc.pages {
			clear(d[pg*ps : (pg+1)*ps])
		}
		if ok, _ := check(tc.name, d); ok {
			t.Errorf("%s: passed the check", tc.name)
		}
	}
	// Freelist naming its own page (bbolt: "page N already freed" on the
	// next commit) and a tree page (a page both used and free).
	flOff := int(lay.Freelist)*ps + 16
	for _, tc := range []struct {
		name string
		id   uint64
	}{{"freelist lists itself", lay.Freelist}, {"freelist lists a tree page", lay.TreePages[0]}, {"freelist lists meta page 0", 0}} {
		d := append([]byte(nil), orig...)
		binary.LittleEndian.PutUint64(d[flOff:], tc.id)
		if ok, _ := check(tc.name, d); ok {
			t.Errorf("%s: passed the check", tc.name)
		}
	}

	// Truncation at every half page, and at odd offsets.
	cuts := []int{1, 15, 100, 1023, 1024, 4095, ps + 100}
	for c := ps / 2; c < len(orig); c += ps / 2 {
		cuts = append(cuts, c, c-1)
	}
	truncErr, truncOK := 0, 0
	for _, c := range cuts {
		if c <= 0 || c >= len(orig) {
			continue
		}
		passed, intact := check(fmt.Sprintf("truncated at %d", c), orig[:c])
		switch {
		case !passed:
			truncErr++
		case c >= used && intact:
			truncOK++
		default:
			t.Errorf("truncated at %d (pages end at %d): passed, intact %v", c, used, intact)
		}
	}
	t.Logf("truncations: %d refused, %d beyond the used pages and intact", truncErr, truncOK)

	// Random single-bit flips over the used pages, fixed seed.
	inPayload := func(off int) bool {
		for _, r := range lay.Payload {
			if off >= r[0] && off < r[1] {
				return true
			}
		}
		return false
	}
	rng := rand.New(rand.NewPCG(10, 10))
	refused, intact, payloadChanged := 0, 0, 0
	for i := 0; i < 600; i++ {
		off, bit := rng.IntN(used), byte(1)<<rng.IntN(8)
		d := append([]byte(nil), orig...)
		d[off] ^= bit
		name := fmt.Sprintf("flip %d: byte %d (page %d +%d) bit %#02x", i, off, off/ps, off%ps, bit)
		passed, same := check(name, d)
		switch {
		case !passed:
			refused++
		case same:
			intact++
		case inPayload(off):
			payloadChanged++ // bbolt has no data checksum; the record still decodes
		default:
			t.Errorf("%s: passed the check, reads differently, and is not inside a key or value", name)
		}
	}
	t.Logf("600 bit flips: %d refused with a typed error, %d intact, %d changed a record's bytes undetectably (no data checksum in bbolt)",
		refused, intact, payloadChanged)
	if refused == 0 || intact == 0 {
		t.Fatal("the flips did not exercise both outcomes")
	}
}

// TestLedgerDamageCrashesBboltToday proves, in child processes, that the
// damaged files the check refuses do kill a process that opens them with
// OpenLedger as vtpmd does today, while CheckLedger returns a typed error.
func TestLedgerDamageCrashesBboltToday(t *testing.T) {
	t.Parallel()
	path, _ := goldenLedger(t)
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lay, err := migrate.LayoutOfLedger(path)
	if err != nil {
		t.Fatal(err)
	}
	ps := lay.PageSize
	dir := t.TempDir()
	selfFree := append([]byte(nil), orig...)
	binary.LittleEndian.PutUint64(selfFree[int(lay.Freelist)*ps+16:], lay.Freelist)
	sort.Slice(lay.TreePages, func(i, j int) bool { return lay.TreePages[i] > lay.TreePages[j] })
	for _, tc := range []struct {
		name string
		data []byte
		want string // in the child's output
	}{
		{"truncated before the freelist page", orig[:int(lay.Freelist)*ps], "fatal error: fault"},
		{"truncated to 3 pages", orig[:3*ps], "panic: invalid freelist page"},
		{"freelist lists itself", selfFree, "already freed"},
	} {
		p := writeVariant(t, dir, strings.ReplaceAll(tc.name, " ", "_")+".db", tc.data)
		cmd := exec.Command(os.Args[0], "-test.run=^TestLedgerOpenChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), "VTPMM_LEDGER_CHILD="+p)
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), tc.want) {
			t.Errorf("%s: OpenLedger in a child: %v, output lacks %q:\n%s", tc.name, err, tc.want, tail(out))
		} else {
			t.Logf("%s: today's OpenLedger dies: %s", tc.name, firstLine(out, tc.want))
		}
		_, err = migrate.CheckLedger(p, migrate.LedgerCheckOptions{})
		wantDamaged(t, tc.name, p, err)
		t.Logf("%s: %v", tc.name, err)
	}
}

// TestLedgerOpenChild runs only as the child of
// TestLedgerDamageCrashesBboltToday.
func TestLedgerOpenChild(t *testing.T) {
	p := os.Getenv("VTPMM_LEDGER_CHILD")
	if p == "" {
		t.Skip("child process of TestLedgerDamageCrashesBboltToday")
	}
	l, err := migrate.OpenLedger(p, nil)
	if err != nil {
		t.Fatalf("OpenLedger: %v", err)
	}
	all, err := l.All()
	t.Logf("read %d transactions, %v", len(all), err)
	_ = l.Close()
}

func tail(b []byte) string {
	if len(b) > 1500 {
		b = b[len(b)-1500:]
	}
	return string(b)
}

func firstLine(b []byte, sub string) string {
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, sub) {
			return strings.TrimSpace(l)
		}
	}
	return ""
}
