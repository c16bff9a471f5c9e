package migrate

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Role is this host's side of a transaction.
type Role string

// Roles.
const (
	RoleSource      Role = "source"
	RoleDestination Role = "destination"
)

// TxState is a transaction's state on one host.
type TxState string

// Transaction states. Final states end in "committed" or "aborted".
const (
	SrcBegun     TxState = "src-begun"     // persisted before anything is sent
	SrcPrepared  TxState = "src-prepared"  // destination holds PENDING keys
	SrcMigrated  TxState = "src-migrated"  // hypervisor finished (per-VM outcome recorded)
	SrcCommitted TxState = "src-committed" // final: destination committed, source keys shredded
	SrcAborted   TxState = "src-aborted"   // final: source keeps ownership

	DstPending   TxState = "dst-pending"   // persisted before keys are stored
	DstCommitted TxState = "dst-committed" // final: ACTIVE at the new generation
	DstAborted   TxState = "dst-aborted"   // final: PENDING keys shredded
)

// Final reports whether no further step follows.
func (s TxState) Final() bool {
	return s == SrcCommitted || s == SrcAborted || s == DstCommitted || s == DstAborted
}

// TxVM is one VM in a transaction.
type TxVM struct {
	UUID       string  `json:"uuid"`
	Name       string  `json:"name,omitempty"`
	Generation uint64  `json:"generation"`        // the generation the destination will hold
	Outcome    Outcome `json:"outcome,omitempty"` // source: migrated, failed; destination: committed, aborted
	Error      string  `json:"error,omitempty"`
}

// Tx is a transaction as one host's ledger records it.
type Tx struct {
	ID     string  `json:"id"`
	Role   Role    `json:"role"`
	Peer   string  `json:"peer"`
	State  TxState `json:"state"`
	VMs    []TxVM  `json:"vms"`
	Reason string  `json:"reason,omitempty"`
	// Pulled marks a source transaction the destination asked for (hook
	// mode): the hypervisor migrates the VMs, and Reconcile leaves the
	// transaction alone while the hypervisor migrates them or until Lease.
	Pulled bool      `json:"pulled,omitempty"`
	Lease  time.Time `json:"lease,omitzero"`
	// Confirmed marks a source transaction whose migration this host
	// confirmed to the destination (confirmPull), which may then have run
	// the VMs on their PENDING keys. Recovery aborts a src-prepared
	// transaction whose VMs run nowhere only if it is not confirmed.
	Confirmed bool `json:"confirmed,omitempty"`
	// Restore marks a destination transaction that restores keys from
	// escrow bundles (migrate/restore.go): the operator's registry
	// transaction, not the relaying peer, decides its outcome.
	Restore bool `json:"restore,omitempty"`
	// KeyOnly marks a transaction that moves keys alone, to the host that
	// holds the VMs' domains and vTPM states (reunite.go): no hypervisor
	// migration is part of it.
	KeyOnly bool      `json:"key_only,omitempty"`
	Created time.Time `json:"created"`
	Updated time.Time `json:"updated"`
}

var (
	bucketTx = []byte("tx") // txID -> Tx
	bucketVM = []byte("vm") // vmUUID -> txID of the open transaction
)

// Ledger is the ownership ledger of one host: a bbolt file with every
// transaction and, per VM, the one open transaction that holds it. bbolt's
// serialisable write transactions make "exactly one of two concurrent
// migrations of a VM wins" a property of Begin.
type Ledger struct {
	db  *bolt.DB
	now func() time.Time
}

// OpenLedger opens (creating) the ledger file. Only one process may hold it.
func OpenLedger(path string, now func() time.Time) (*Ledger, error) {
	if now == nil {
		now = time.Now
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open ledger %s: %w", path, err)
	}
	err = db.Update(func(t *bolt.Tx) error {
		for _, b := range [][]byte{bucketTx, bucketVM, bucketApart} {
			if _, err := t.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open ledger %s: %w", path, err)
	}
	return &Ledger{db: db, now: now}, nil
}

// Close closes the ledger file.
func (l *Ledger) Close() error { return l.db.Close() }

// Begin records a new open transaction. It fails with ErrReplay if the ID
// was ever used here, and with ErrBusy if any of its VMs is held by another
// open transaction.
func (l *Ledger) Begin(tx Tx) error {
	now := l.now().UTC()
	tx.Created, tx.Updated = now, now
	return l.db.Update(func(t *bolt.Tx) error {
		txs, vms := t.Bucket(bucketTx), t.Bucket(bucketVM)
		if txs.Get([]byte(tx.ID)) != nil {
			return fmt.Errorf("begin %s: %w: transaction id already used on this host", tx.ID, ErrReplay)
		}
		for _, vm := range tx.VMs {
			if other := vms.Get([]byte(vm.UUID)); other != nil {
				return fmt.Errorf("begin %s: %w: VM %s is held by transaction %s", tx.ID, ErrBusy, vm.UUID, other)
			}
			if err := vms.Put([]byte(vm.UUID), []byte(tx.ID)); err != nil {
				return err
			}
		}
		return putTx(txs, tx)
	})
}

func putTx(b *bolt.Bucket, tx Tx) error {
	v, err := json.Marshal(tx)
	if err != nil {
		return err
	}
	return b.Put([]byte(tx.ID), v)
}

func getTx(b *bolt.Bucket, id string) (Tx, error) {
	v := b.Get([]byte(id))
	if v == nil {
		return Tx{}, fmt.Errorf("transaction %s: %w", id, ErrUnknownTx)
	}
	var tx Tx
	if err := json.Unmarshal(v, &tx); err != nil {
		return Tx{}, fmt.Errorf("transaction %s: ledger record: %w", id, err)
	}
	return tx, nil
}

// Get returns a transaction.
func (l *Ledger) Get(id string) (Tx, error) {
	var tx Tx
	err := l.db.View(func(t *bolt.Tx) error {
		var err error
		tx, err = getTx(t.Bucket(bucketTx), id)
		return err
	})
	return tx, err
}

// Update changes an open transaction. Moving it to a final state releases
// its VMs.
func (l *Ledger) Update(id string, f func(*Tx) error) (Tx, error) {
	var out Tx
	err := l.db.Update(func(t *bolt.Tx) error {
		txs := t.Bucket(bucketTx)
		tx, err := getTx(txs, id)
		if err != nil {
			return err
		}
		if tx.State.Final() {
			return fmt.Errorf("transaction %s is already %s", id, tx.State)
		}
		if err := f(&tx); err != nil {
			return err
		}
		tx.Updated = l.now().UTC()
		if tx.State.Final() {
			vms := t.Bucket(bucketVM)
			for _, vm := range tx.VMs {
				if string(vms.Get([]byte(vm.UUID))) == tx.ID {
					if err := vms.Delete([]byte(vm.UUID)); err != nil {
						return err
					}
				}
			}
		}
		out = tx
		return putTx(txs, tx)
	})
	return out, err
}

// SetState is Update for a state change with a reason.
func (l *Ledger) SetState(id string, s TxState, reason string) (Tx, error) {
	return l.Update(id, func(tx *Tx) error {
		tx.State = s
		if reason != "" {
			tx.Reason = reason
		}
		return nil
	})
}

// OpenTxs returns the transactions that are not final, oldest first.
func (l *Ledger) OpenTxs() ([]Tx, error) {
	return l.list(func(tx Tx) bool { return !tx.State.Final() })
}

// All returns every transaction, oldest first.
func (l *Ledger) All() ([]Tx, error) { return l.list(func(Tx) bool { return true }) }

func (l *Ledger) list(keep func(Tx) bool) ([]Tx, error) {
	var out []Tx
	err := l.db.View(func(t *bolt.Tx) error {
		return t.Bucket(bucketTx).ForEach(func(_, v []byte) error {
			var tx Tx
			if err := json.Unmarshal(v, &tx); err != nil {
				return err
			}
			if keep(tx) {
				out = append(out, tx)
			}
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, err
}

// Holder returns the open transaction holding a VM, if any.
func (l *Ledger) Holder(vmUUID string) (string, error) {
	var id string
	err := l.db.View(func(t *bolt.Tx) error {
		if v := t.Bucket(bucketVM).Get([]byte(vmUUID)); v != nil {
			id = string(v)
			return nil
		}
		return errNoHolder
	})
	return id, err
}

var errNoHolder = errors.New("no open transaction holds the VM")
