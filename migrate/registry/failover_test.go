package registry_test

import (
	"sync"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/registry"
)

// TestTakeOver: the failover CAS needs the old owner fenced after the
// record's last change (F10, F11) and the record unchanged; of two
// standbys racing, exactly one wins.
func TestTakeOver(t *testing.T) {
	f := newFleet(t)
	c := f.c.Open(t, "host-c")
	if _, err := f.a.CreateVM(f.ctx, "vm-1", "host-a"); err != nil {
		t.Fatal(err)
	}
	rec, rev, err := f.b.VMRev(f.ctx, "vm-1")
	if err != nil || rec.Owner != "host-a" || rev == 0 {
		t.Fatalf("VMRev: %+v %d %v", rec, rev, err)
	}
	take := registry.TakeOver{VM: "vm-1", Expect: rec, ExpectRev: rev, Owner: "host-b", Generation: 2, Fenced: []string{"host-a"}}
	// Not fenced: refused (rule fenced-for-record).
	_, err = f.b.TakeOver(f.ctx, take)
	mustErrIs(t, err, registry.ErrNotFenced)
	if _, err := f.b.PutFence(f.ctx, "host-a", "host-b"); err != nil {
		t.Fatal(err)
	}
	// Two standbys race on the same record: exactly one wins.
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, cl := range []*registry.Client{f.b, c} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tk := take
			tk.Owner = []string{"host-b", "host-c"}[i]
			_, errs[i] = cl.TakeOver(f.ctx, tk)
		}()
	}
	wg.Wait()
	wins := 0
	for _, e := range errs {
		if e == nil {
			wins++
		}
	}
	if wins != 1 {
		t.Fatalf("%d winners: %v", wins, errs)
	}
	got := f.vm(t, "vm-1")
	if got.Generation != 2 || got.Owner == "host-a" {
		t.Fatalf("record after the race: %+v", got)
	}
	// The fence of host-a no longer applies to the new record (F11): a
	// takeover from the new owner needs its own fence.
	rec2, rev2, _ := f.a.VMRev(f.ctx, "vm-1")
	_, err = f.a.TakeOver(f.ctx, registry.TakeOver{VM: "vm-1", Expect: rec2, ExpectRev: rev2, Owner: "host-a", Generation: 3, Fenced: []string{"host-a"}})
	mustErrIs(t, err, registry.ErrNotFenced)
	// A fence written before the record's last change does not count.
	if _, err := f.a.PutFence(f.ctx, rec2.Owner, "host-a"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.a.Bump(f.ctx, registry.Bump{VM: "vm-1", Expect: &rec2, Owner: rec2.Owner, Generation: 3}); err != nil {
		t.Fatal(err)
	}
	rec3, rev3, _ := f.a.VMRev(f.ctx, "vm-1")
	_, err = f.a.TakeOver(f.ctx, registry.TakeOver{VM: "vm-1", Expect: rec3, ExpectRev: rev3, Owner: "host-a", Generation: 4, Fenced: []string{rec3.Owner}})
	mustErrIs(t, err, registry.ErrNotFenced)
	// A fenced (state) new owner is refused.
	if _, err := f.a.PutFence(f.ctx, rec3.Owner, "host-a"); err != nil {
		t.Fatal(err)
	}
	_, err = f.a.TakeOver(f.ctx, registry.TakeOver{VM: "vm-1", Expect: rec3, ExpectRev: rev3, Owner: "host-f", Generation: 4, Fenced: []string{rec3.Owner}})
	mustErrIs(t, err, registry.ErrHostFenced)
	// A draining new owner is refused too, in the same compare-and-swap: a
	// drain that lands between the promoter's own check (rule draining) and
	// its TakeOver still stops the promotion.
	_, err = f.a.TakeOver(f.ctx, registry.TakeOver{VM: "vm-1", Expect: rec3, ExpectRev: rev3, Owner: "host-d", Generation: 4, Fenced: []string{rec3.Owner}})
	mustErrIs(t, err, registry.ErrHostNotActive)
	if got := f.vm(t, "vm-1"); got.Generation != 3 {
		t.Fatalf("record after refused takeovers: %+v", got)
	}
}

// TestStandbyAssignRefresh: a refresh never re-creates a standby the
// operator removed; generation 0 records (assigned) decode.
func TestStandbyAssignRefresh(t *testing.T) {
	f := newFleet(t)
	err := f.b.RefreshStandby(f.ctx, registry.Standby{VM: "vm-1", Host: "host-b", Generation: 1})
	mustErrIs(t, err, registry.ErrNotFound)
	if err := f.a.AssignStandby(f.ctx, "vm-1", "host-b"); err != nil {
		t.Fatal(err)
	}
	ss, err := f.a.Standbys(f.ctx, "vm-1")
	if err != nil || len(ss) != 1 || ss[0].Generation != 0 {
		t.Fatalf("standbys %+v %v", ss, err)
	}
	if err := f.b.RefreshStandby(f.ctx, registry.Standby{VM: "vm-1", Host: "host-b", Generation: 1}); err != nil {
		t.Fatal(err)
	}
	if err := f.a.AssignStandby(f.ctx, "vm-1", "host-b"); err != nil {
		t.Fatal(err)
	}
	if ss, _ := f.a.Standbys(f.ctx, "vm-1"); len(ss) != 1 || ss[0].Generation != 1 {
		t.Fatalf("assign overwrote a replica's record: %+v", ss)
	}
	if err := f.a.DropStandby(f.ctx, "vm-1", "host-b"); err != nil {
		t.Fatal(err)
	}
	mustErrIs(t, f.b.RefreshStandby(f.ctx, registry.Standby{VM: "vm-1", Host: "host-b", Generation: 1}), registry.ErrNotFound)
}

// TestReassertRacesTakeOver: the fenced owner's take-back (Reassert) and
// the fencer's promotion (TakeOver) are compare-and-swaps on the same
// record revision: whichever comes first, and when they race, exactly one
// wins; the loser gets ErrConflict (Reassert) or a record error
// (TakeOver), and the record is either the owner's, unchanged at a new
// revision past the fence, or the fencer's at a raised generation.
func TestReassertRacesTakeOver(t *testing.T) {
	for _, order := range []string{"reassert-first", "takeover-first", "race"} {
		t.Run(order, func(t *testing.T) {
			f := newFleet(t)
			if _, err := f.a.CreateVM(f.ctx, "vm-2", "host-a"); err != nil {
				t.Fatal(err)
			}
			rec, rev, err := f.a.VMRev(f.ctx, "vm-2")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.b.PutFence(f.ctx, "host-a", "host-b"); err != nil { // host-b fenced host-a (for another VM)
				t.Fatal(err)
			}
			reassert := func() error { _, err := f.a.Reassert(f.ctx, rec, rev); return err }
			takeOver := func() error {
				_, err := f.b.TakeOver(f.ctx, registry.TakeOver{VM: "vm-2", Expect: rec, ExpectRev: rev, Owner: "host-b", Generation: 2, Fenced: []string{"host-a"}})
				return err
			}
			var errR, errT error
			switch order {
			case "reassert-first":
				errR, errT = reassert(), takeOver()
			case "takeover-first":
				errT, errR = takeOver(), reassert()
			default:
				var wg sync.WaitGroup
				wg.Add(2)
				go func() { defer wg.Done(); errR = reassert() }()
				go func() { defer wg.Done(); errT = takeOver() }()
				wg.Wait()
			}
			if (errR == nil) == (errT == nil) {
				t.Fatalf("reassert: %v; takeover: %v: want exactly one to win", errR, errT)
			}
			got, grev, err := f.a.VMRev(f.ctx, "vm-2")
			if err != nil {
				t.Fatal(err)
			}
			_, frev, _ := f.a.FenceOf(f.ctx, "host-a")
			switch {
			case errR == nil:
				mustErrIs(t, errT, registry.ErrConflict)
				if got.Owner != "host-a" || got.Generation != 1 || grev <= frev {
					t.Fatalf("after the take-back: %+v at %d (fence at %d)", got, grev, frev)
				}
			default:
				mustErrIs(t, errR, registry.ErrConflict)
				if got.Owner != "host-b" || got.Generation != 2 {
					t.Fatalf("after the takeover: %+v", got)
				}
			}
		})
	}
}
