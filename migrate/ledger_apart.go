package migrate

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/vtpmm/vtpmm/internal/ids"
	"github.com/vtpmm/vtpmm/vtpm"
)

// bucketApart holds, per VM, where its domain and vTPM state are while its
// key is on this host (reunite.go): VM UUID -> Apart.
var bucketApart = []byte("apart")

// Apart records a VM whose key this host owns while its domain and its
// vTPM state (encrypted under that key) are on Host: the hypervisor
// migrated the VM there, and Host then lost its record of the transaction
// (its TPM, and with it its key store and ledger, was replaced) before it
// committed. Recovery kept the key here; Reunite moves it to Host.
type Apart struct {
	VM    string    `json:"vm"`
	Host  string    `json:"host"`
	Tx    string    `json:"tx"` // the migration recovery aborted
	Since time.Time `json:"since"`
}

// MarkApart records (or replaces) a.
func (l *Ledger) MarkApart(a Apart) error {
	if a.Since.IsZero() {
		a.Since = l.now().UTC()
	}
	v, err := json.Marshal(a)
	if err != nil {
		return err
	}
	return l.db.Update(func(t *bolt.Tx) error {
		return t.Bucket(bucketApart).Put([]byte(a.VM), v)
	})
}

// ClearApart forgets the VM's record, if any.
func (l *Ledger) ClearApart(vm string) error {
	return l.db.Update(func(t *bolt.Tx) error {
		return t.Bucket(bucketApart).Delete([]byte(vm))
	})
}

// Aparts returns every record, oldest first.
func (l *Ledger) Aparts() ([]Apart, error) {
	var out []Apart
	err := l.db.View(func(t *bolt.Tx) error {
		return t.Bucket(bucketApart).ForEach(func(k, v []byte) error {
			a, err := decodeApart(string(k), v)
			if err != nil {
				return err
			}
			out = append(out, a)
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Since.Before(out[j].Since) })
	return out, err
}

// decodeApart decodes and checks one record of the apart bucket.
func decodeApart(key string, v []byte) (Apart, error) {
	var a Apart
	dec := json.NewDecoder(bytes.NewReader(v))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&a); err != nil {
		return a, fmt.Errorf("apart record %q: does not decode (%v)", key, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return a, fmt.Errorf("apart record %q: trailing bytes after the record", key)
	}
	switch {
	case vtpm.CheckVMID(key) != nil || a.VM != key:
		return a, fmt.Errorf("apart record %q: names VM %q", key, a.VM)
	case !ids.IsHostID(a.Host):
		return a, fmt.Errorf("apart record %q: host %q", key, a.Host)
	case !txIDRE.MatchString(a.Tx):
		return a, fmt.Errorf("apart record %q: transaction %q", key, a.Tx)
	}
	return a, nil
}
