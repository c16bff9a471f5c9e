package migrate

import "os"

// LedgerLayout is what the ledger check's walk sees in a file, for tests
// that damage it on purpose.
type LedgerLayout struct {
	PageSize  int
	Pages     uint64
	Freelist  uint64 // page id of the freelist
	FreeIDs   []uint64
	Payload   [][2]int // file offsets of every key and value on tree pages
	TreePages []uint64 // pages in use by the tree (not meta, not freelist)
}

// LayoutOfLedger walks an intact ledger file.
func LayoutOfLedger(path string) (LedgerLayout, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return LedgerLayout{}, err
	}
	w, m, err := walkLedger(data)
	if err != nil {
		return LedgerLayout{}, err
	}
	l := LedgerLayout{PageSize: int(m.pageSize), Pages: m.hwm, Freelist: m.freelist, Payload: w.payload}
	for id := range w.free {
		l.FreeIDs = append(l.FreeIDs, id)
	}
	for id := range w.reachable {
		if id >= 2 && id != m.freelist {
			l.TreePages = append(l.TreePages, id)
		}
	}
	return l, nil
}
