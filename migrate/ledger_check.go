package migrate

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"runtime/debug"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/vtpmm/vtpmm/vtpm"
)

// LedgerError says what is wrong with a ledger file and what to do.
type LedgerError struct {
	Path    string
	Problem string
	Fix     string
	Err     error // ErrLedgerDamaged or ErrLedgerHistoryLost
}

func (e *LedgerError) Error() string {
	return fmt.Sprintf("ledger %s: %v: %s; %s", e.Path, e.Err, e.Problem, e.Fix)
}

// Unwrap returns the sentinel.
func (e *LedgerError) Unwrap() error { return e.Err }

const (
	fixDamaged = "vtpmd does not open it (bbolt would crash or lose transactions). Move it aside and keep it as evidence," +
		" restore the ledger from this host's backup, and start vtpmd: open transactions are reconciled with the peers"
	fixHistory = "vtpmd does not create a new, empty ledger over lost history. Restore the ledger from this host's backup;" +
		" if none exists, confirm every VM's owner with the registry or the peers and accept the state ('vtpmd anchor accept')"
	// maxLedgerCheck bounds the file the check reads into memory.
	maxLedgerCheck = 1 << 30
)

// LedgerCheckOptions tunes CheckLedger.
type LedgerCheckOptions struct {
	// HadHistory says the data directory shows that this host committed
	// ownership changes (vtpm.Anchor.Advances() > 0): a missing, empty or
	// transaction-less ledger is then ErrLedgerHistoryLost.
	HadHistory bool
}

// LedgerReport describes a ledger that passed the check.
type LedgerReport struct {
	Path         string
	Missing      bool // no file (a new host): OpenLedger creates it
	Size         int64
	PageSize     int
	TxID         uint64 // bbolt's transaction id of the meta in use
	Pages        uint64 // high-water mark
	FreePages    int
	Transactions int
	Open         int // transactions not final
}

// CheckLedger validates the ledger file before bbolt opens it, so that a
// truncated, bit-flipped or zero-length file gives a *LedgerError naming
// the file, what is wrong and what to do, never a crash:
//   - both meta pages: magic, version, page size and bbolt's checksum (one
//     bad meta page is refused too: bbolt would silently fall back to the
//     previous transaction);
//   - the file's length against the meta's high-water page;
//   - every page bbolt can reach from the meta, on a copy in memory with
//     bounds checks: ids, headers, types, element offsets and lengths, key
//     order, inline buckets, the freelist, pages referenced twice,
//     reachable pages on the freelist and pages neither used nor free;
//   - the records: every transaction decodes, names itself, has a known
//     role and state and valid VM ids; the VM index points at open
//     transactions that hold the VM;
//   - then bbolt itself opens the file read-only and runs tx.Check, in a
//     goroutine with SetPanicOnFault and recover.
//
// It never modifies the file. A missing or zero-length file is a new host's
// (the report says Missing) unless opts.HadHistory. bbolt keeps no checksum
// on data pages: a bit flip inside a record's bytes that still decodes to a
// valid record cannot be detected here.
func CheckLedger(path string, opts LedgerCheckOptions) (rep *LedgerReport, err error) {
	rep = &LedgerReport{Path: path}
	dmg := func(format string, a ...any) error {
		return &LedgerError{Path: path, Problem: fmt.Sprintf(format, a...), Fix: fixDamaged, Err: ErrLedgerDamaged}
	}
	lost := func(what string) error {
		return &LedgerError{Path: path, Problem: what + ", but this host's rollback anchor counted ownership changes", Fix: fixHistory, Err: ErrLedgerHistoryLost}
	}
	st, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if opts.HadHistory {
			return nil, lost("the file does not exist")
		}
		rep.Missing = true
		return rep, nil
	case err != nil:
		return nil, fmt.Errorf("check ledger %s: %w", path, err)
	case !st.Mode().IsRegular():
		return nil, dmg("not a regular file (%v)", st.Mode().Type())
	case st.Size() == 0:
		if opts.HadHistory {
			return nil, lost("the file is empty (zero bytes)")
		}
		rep.Missing = true
		return rep, nil
	case st.Size() > maxLedgerCheck:
		return nil, dmg("%d bytes, more than the %d this check reads", st.Size(), maxLedgerCheck)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("check ledger %s: %w", path, err)
	}
	rep.Size = int64(len(data))

	// The walk works on a copy with Go's bounds checks; a slip there must
	// still end as an error, not a crash.
	defer func() {
		if r := recover(); r != nil {
			rep, err = nil, dmg("the structure check failed: %v", r)
		}
	}()
	w, m, perr := walkLedger(data)
	if perr != nil {
		return nil, dmg("%v", perr)
	}
	rep.PageSize, rep.TxID, rep.Pages, rep.FreePages = int(m.pageSize), m.txid, m.hwm, len(w.free)
	n, open, perr := checkRecords(w.top)
	if perr != nil {
		return nil, dmg("%v", perr)
	}
	rep.Transactions, rep.Open = n, open
	if n == 0 && opts.HadHistory {
		return nil, lost("the file holds no transaction")
	}
	if err := boltCheck(path); err != nil {
		if errors.Is(err, ErrLedgerInUse) {
			return nil, fmt.Errorf("check ledger %s: %w", path, err)
		}
		return nil, dmg("bbolt's own check: %v", err)
	}
	return rep, nil
}

// walkLedger checks the meta pages and walks the tree of the meta bbolt
// will use.
func walkLedger(data []byte) (*boltWalk, boltMeta, error) {
	if len(data) < 2*1024 {
		return nil, boltMeta{}, fmt.Errorf("the file is %d bytes, shorter than bbolt's two meta pages", len(data))
	}
	m0, ok0 := decodeMeta(data)
	ps := uint64(0)
	if ok0 {
		ps = uint64(m0.pageSize)
	} else {
		// Like bbolt: find meta page 1 at the candidate page sizes.
		for i := 0; i <= 14; i++ {
			pos := 1024 << i
			if pos+boltPageHeader+boltMetaSize > len(data) {
				break
			}
			if m, ok := decodeMeta(data[pos:]); ok && int(m.pageSize) == pos {
				ps = uint64(pos)
				break
			}
		}
	}
	if ps == 0 {
		return nil, boltMeta{}, fmt.Errorf("neither meta page is valid (meta page 0: %s)", m0.problem())
	}
	if ps < 1024 || ps > 1<<24 || ps&(ps-1) != 0 {
		return nil, boltMeta{}, fmt.Errorf("page size %d is not a power of two between 1 KiB and 16 MiB", ps)
	}
	if uint64(len(data)) < 2*ps {
		return nil, boltMeta{}, fmt.Errorf("the file is %d bytes, shorter than its two meta pages of %d bytes", len(data), ps)
	}
	m1, ok1 := decodeMeta(data[ps:])
	switch {
	case !ok0 && !ok1:
		return nil, boltMeta{}, fmt.Errorf("neither meta page is valid (meta page 0: %s; meta page 1: %s)", m0.problem(), m1.problem())
	case !ok0:
		return nil, boltMeta{}, fmt.Errorf("meta page 0 is invalid (%s); bbolt would fall back to meta page 1 (transaction %d) and could lose the newest transaction", m0.problem(), m1.txid)
	case !ok1:
		return nil, boltMeta{}, fmt.Errorf("meta page 1 is invalid (%s); bbolt would fall back to meta page 0 (transaction %d) and could lose the newest transaction", m1.problem(), m0.txid)
	case m0.pageSize != m1.pageSize:
		return nil, boltMeta{}, fmt.Errorf("the meta pages disagree on the page size (%d, %d)", m0.pageSize, m1.pageSize)
	}
	m := m0
	if m1.txid > m0.txid {
		m = m1
	}
	size := uint64(len(data))
	switch {
	case m.hwm < 3 || m.hwm > size/ps+1 || m.hwm*ps > size:
		return nil, boltMeta{}, fmt.Errorf("the file is %d bytes, but transaction %d uses %d pages of %d bytes (%d bytes): it was truncated",
			size, m.txid, m.hwm, ps, m.hwm*ps)
	case m.root < 2 || m.root >= m.hwm:
		return nil, boltMeta{}, fmt.Errorf("the root page %d is outside the file's pages 2..%d", m.root, m.hwm-1)
	}
	w := &boltWalk{data: data, ps: ps, hwm: m.hwm, reachable: map[uint64]bool{0: true, 1: true}, free: map[uint64]bool{}}
	if m.freelist != boltNoFreelist {
		if err := w.readFreelist(m.freelist); err != nil {
			return nil, boltMeta{}, err
		}
	}
	if err := w.walkAll(m.root); err != nil {
		return nil, boltMeta{}, err
	}
	if m.freelist != boltNoFreelist {
		for id := uint64(2); id < m.hwm; id++ {
			if !w.reachable[id] && !w.free[id] {
				return nil, boltMeta{}, fmt.Errorf("page %d is neither in use nor free (a reference to it was damaged)", id)
			}
		}
	}
	return w, m, nil
}

// checkRecords checks the ledger's records and counts the transactions.
func checkRecords(top map[string]map[string][]byte) (n, open int, err error) {
	txs, ok := top[string(bucketTx)]
	if !ok {
		return 0, 0, fmt.Errorf("the %q bucket is missing", bucketTx)
	}
	vms, ok := top[string(bucketVM)]
	if !ok {
		return 0, 0, fmt.Errorf("the %q bucket is missing", bucketVM)
	}
	for vm, v := range top[string(bucketApart)] { // absent before its first use
		if _, err := decodeApart(vm, v); err != nil {
			return 0, 0, err
		}
	}
	decoded := map[string]Tx{}
	for id, v := range txs {
		var tx Tx
		dec := json.NewDecoder(bytes.NewReader(v))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&tx); err != nil {
			return 0, 0, fmt.Errorf("transaction %q: the record does not decode (%v)", id, err)
		}
		if _, err := dec.Token(); err != io.EOF {
			return 0, 0, fmt.Errorf("transaction %q: trailing bytes after the record", id)
		}
		if err := checkTx(id, tx); err != nil {
			return 0, 0, err
		}
		decoded[id] = tx
		if !tx.State.Final() {
			open++
		}
	}
	for vm, id := range vms {
		if vtpm.CheckVMID(vm) != nil {
			return 0, 0, fmt.Errorf("the VM index holds %q, not a VM id", vm)
		}
		tx, ok := decoded[string(id)]
		if !ok {
			return 0, 0, fmt.Errorf("the VM index says transaction %q holds VM %s, but there is no such transaction", id, vm)
		}
		if tx.State.Final() || !holdsVM(tx, vm) {
			return 0, 0, fmt.Errorf("the VM index says transaction %s holds VM %s, but it is %s or does not list the VM", id, vm, tx.State)
		}
	}
	return len(decoded), open, nil
}

func checkTx(id string, tx Tx) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("transaction %q: "+format, append([]any{id}, a...)...)
	}
	switch {
	case tx.ID != id:
		return bad("the record names itself %q", tx.ID)
	case tx.Role != RoleSource && tx.Role != RoleDestination:
		return bad("unknown role %q", tx.Role)
	case tx.Peer == "":
		return bad("no peer")
	case len(tx.VMs) == 0:
		return bad("no VM")
	case tx.Created.IsZero() || tx.Updated.Before(tx.Created):
		return bad("timestamps %v, %v", tx.Created.Format(time.RFC3339), tx.Updated.Format(time.RFC3339))
	}
	srcStates := []TxState{SrcBegun, SrcPrepared, SrcMigrated, SrcCommitted, SrcAborted}
	dstStates := []TxState{DstPending, DstCommitted, DstAborted}
	states := srcStates
	if tx.Role == RoleDestination {
		states = dstStates
	}
	known := false
	for _, s := range states {
		known = known || s == tx.State
	}
	if !known {
		return bad("state %q is not a %s state", tx.State, tx.Role)
	}
	for _, vm := range tx.VMs {
		if vtpm.CheckVMID(vm.UUID) != nil {
			return bad("VM id %q", vm.UUID)
		}
		switch vm.Outcome {
		case "", "migrated", "failed", "committed", "aborted":
		default:
			return bad("VM %s: outcome %q", vm.UUID, vm.Outcome)
		}
	}
	return nil
}

func holdsVM(tx Tx, vm string) bool {
	for _, v := range tx.VMs {
		if v.UUID == vm {
			return true
		}
	}
	return false
}

// boltCheck opens the file read-only with bbolt and runs tx.Check, in a
// goroutine that turns a memory fault into a panic and recovers it. The
// structure walk ran first, so bbolt's own goroutine (tx.Check runs one)
// only reads pages that exist.
func boltCheck(path string) error {
	done := make(chan error, 1)
	go func() {
		debug.SetPanicOnFault(true)
		defer func() {
			if r := recover(); r != nil {
				done <- fmt.Errorf("bbolt failed: %v", r)
			}
		}()
		db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
		if errors.Is(err, berrors.ErrTimeout) {
			done <- fmt.Errorf("%w: %v", ErrLedgerInUse, err)
			return
		}
		if err != nil {
			done <- err
			return
		}
		defer db.Close()
		done <- db.View(func(tx *bolt.Tx) error {
			var errs []error
			for e := range tx.Check() {
				errs = append(errs, e)
			}
			return errors.Join(errs...)
		})
	}()
	return <-done
}
