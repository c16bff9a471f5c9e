// Command memcheck is a guest program for migsoak -memcheck: it detects
// guest memory writes that a live migration lost. It keeps -pages pages
// and, in a loop, checks that every page holds the pass number it wrote
// last and then writes the next one. On a correct migration the
// destination's memory equals the source's at the switch-over, so the
// check never fails; a page that reverted to an older value was written
// on the source after its last transfer without being marked dirty. It
// prints, on its standard output (the serial console):
//
//	MEMCHECK start pages=N
//	MEMCHECK alive pass=P              every 10 s
//	MEMCHECK LOST page=I have=H want=W pass=P   one line per stale page
package main

import (
	"flag"
	"fmt"
	"os"
	"time"
	"unsafe"
)

const pageSize = 4096

func main() {
	pages := flag.Int("pages", 1024, "pages written per pass")
	flag.Parse()
	buf := make([]byte, *pages*pageSize)
	base := unsafe.Pointer(&buf[0])
	word := func(i int) *uint64 { return (*uint64)(unsafe.Add(base, i*pageSize)) }
	fmt.Printf("MEMCHECK start pages=%d\n", *pages)
	next := time.Now().Add(10 * time.Second)
	for pass := uint64(1); ; pass++ {
		want := pass - 1
		lost := 0
		for i := 0; i < *pages; i++ {
			if have := *word(i); have != want {
				lost++
				if lost <= 8 {
					fmt.Printf("MEMCHECK LOST page=%d have=%d want=%d pass=%d\n", i, have, want, pass)
				}
			}
			*word(i) = pass
		}
		if lost > 8 {
			fmt.Printf("MEMCHECK LOST %d pages in total at pass=%d\n", lost, pass)
		}
		if pass%256 == 0 && time.Now().After(next) {
			fmt.Printf("MEMCHECK alive pass=%d\n", pass)
			next = time.Now().Add(10 * time.Second)
		}
		if lost > 0 {
			os.Stdout.Sync()
		}
	}
}
