package escrow

import (
	"context"
	"fmt"
	"testing"

	"github.com/vtpmm/vtpmm/vtpm"
)

// The benchmarks measure the software cost of escrow. The source's host
// TPM is not involved: Sealer has no TPM, and the VM key comes from the
// key store, which opens it under the vault key already in memory. So a
// backup costs 0 host TPM commands by construction
// (TestNoTPMByConstruction keeps it so). Run:
//
//	go test ./migrate/escrow -run '^$' -bench . -benchtime 20x

const benchState = 16 << 10 // an encrypted swtpm state blob is tens of KiB

func benchSetup(b *testing.B, pq bool) (*Sealer, []custodianKeys, vtpm.VMKey) {
	cs := newCustodians(b, 5, pq)
	s, err := NewSealer(policyFor(b, 3, cs), SealerOptions{})
	if err != nil {
		b.Fatal(err)
	}
	key, _ := knownKey(b)
	return s, cs, key
}

func kinds() []bool { return []bool{false, true} }

func kindName(pq bool) string {
	if pq {
		return "mlkem768x25519-3of5"
	}
	return "x25519-3of5"
}

func BenchmarkSealBundle(b *testing.B) {
	for _, pq := range kinds() {
		b.Run(kindName(pq), func(b *testing.B) {
			s, _, key := benchSetup(b, pq)
			c := testContents(testState(benchState))
			var size int
			for b.Loop() {
				out, err := s.Seal(context.Background(), c, key)
				if err != nil {
					b.Fatal(err)
				}
				size = len(out)
			}
			b.ReportMetric(float64(size), "bundle-bytes")
		})
	}
}

func BenchmarkOpenBundle(b *testing.B) {
	for _, pq := range kinds() {
		b.Run(kindName(pq), func(b *testing.B) {
			s, cs, key := benchSetup(b, pq)
			bundle, err := s.Seal(context.Background(), testContents(testState(benchState)), key)
			if err != nil {
				b.Fatal(err)
			}
			ids := identitiesOf(b, cs[1], cs[3], cs[4]) // k of them, not the first ones
			for b.Loop() {
				o, err := Open(context.Background(), bundle, testVM, ids, OpenOptions{})
				if err != nil {
					b.Fatal(err)
				}
				o.Destroy()
			}
		})
	}
}

// BenchmarkBackup100VMs seals 100 VMs (each its own key and state) under
// a 3-of-5 policy: the periodic backup's pure sealing cost on the source.
// The "+write" variant adds the Writer's atomic 0600 files with fsync.
func BenchmarkBackup100VMs(b *testing.B) {
	for _, pq := range kinds() {
		for _, write := range []bool{false, true} {
			name := kindName(pq)
			if write {
				name += "+write"
			}
			b.Run(name, func(b *testing.B) {
				s, _, _ := benchSetup(b, pq)
				type vm struct {
					c   Contents
					key vtpm.VMKey
				}
				vms := make([]vm, 100)
				for i := range vms {
					k, _ := knownKey(b)
					c := testContents(testState(benchState))
					c.VM = VM{UUID: fmt.Sprintf("0e2e0e2e-0000-4000-8000-%012d", i), Name: fmt.Sprintf("vm%d", i)}
					vms[i] = vm{c, k}
				}
				w := &Writer{Layout: Layout{Dir: b.TempDir()}, Keep: 1}
				gen := uint64(0)
				for b.Loop() {
					gen++ // a new name every round
					for _, v := range vms {
						v.c.Generation = gen
						out, err := s.Seal(context.Background(), v.c, v.key)
						if err != nil {
							b.Fatal(err)
						}
						if write {
							if _, err := w.Write(context.Background(), out); err != nil {
								b.Fatal(err)
							}
						}
					}
				}
				b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/100/1000, "ms/VM")
			})
		}
	}
}
