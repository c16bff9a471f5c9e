// Package audit is the append-only, hash-chained audit log of vtpmd: every
// key release, refused release, migration commit and abort is one JSON
// line in a file (mode 0600), fsynced before Append returns.
//
// # Record format
//
// One record per line, the JSON object of Record with its fields in this
// order (encoding/json, no spaces, HTML characters escaped as \u003c etc.):
//
//		{"seq":1,"time":"2026-03-01T12:00:00Z","host":"host-a","event":"key-release",
//		 "vm":"<uuid>","peer":"host-b","generation":3,"rule":"","detail":"...",
//		 "prev":"<64 hex>","hash":"<64 hex>"}
//
//	  - seq counts from 1 without gaps; time is UTC, RFC 3339 with nanoseconds
//	    as encoding/json writes it.
//	  - hash is the lowercase hex SHA-256 of the record's canonical encoding
//	    without the hash member, that is the same JSON object ending with the
//	    prev member.
//	  - prev is the lowercase hex SHA-256 of the previous line exactly as
//	    stored (without its newline). The first record's prev is Genesis, 64
//	    zeros.
//
// A line must be byte for byte the canonical encoding of the record it
// decodes to, so every edit is reported at the record that was edited.
//
// # What the chain proves, and what it does not
//
// Verify detects an edited, deleted, inserted or reordered record. A hash
// chain has no secret, though: someone who can write the file can rewrite
// it wholesale and recompute every hash, and can drop records from the
// end. To detect that, export the head (Summary.Last, or Log.Head: the
// SHA-256 of the last line, which the next record will carry as prev) to a
// system the host cannot rewrite, and compare later.
//
// # Crash recovery
//
// Append writes each line with one write call and fsyncs it. A crash
// during that write can leave a partial last line without its newline.
// Verify reports that case as ErrTruncated, distinct from ErrTampered.
// Open repairs it by truncating the file to the end of the last complete
// line and logs a warning: the partial record belongs to an Append that
// never returned success, so no acknowledged record is lost. Any other
// defect makes Open refuse the file; move it aside (keep it as evidence)
// and start a new log.
package audit
