package audit

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Summary describes a verified chain.
type Summary struct {
	Records int    // number of records
	Last    string // head hash: SHA-256 of the last line (Genesis when empty)
}

// Verify reads a whole audit log and checks every record: canonical JSON,
// its hash, its prev link and its seq. On a defect it returns an error
// wrapping a *ChainError, which unwraps to ErrTampered or ErrTruncated;
// read errors are returned wrapped as they are.
func Verify(r io.Reader) (Summary, error) {
	return Read(r, nil)
}

// Read verifies the log like Verify and calls fn with each record, in
// order, once it is verified. Records after a defect are not passed to fn.
// An error from fn stops the reading and is returned as it is.
func Read(r io.Reader, fn func(Record) error) (Summary, error) {
	s, _, err := readChain(r, fn)
	if err != nil {
		var ce *ChainError
		if errors.As(err, &ce) {
			return s, fmt.Errorf("verify audit log: %w", err)
		}
		return s, err
	}
	return s, nil
}

// readChain verifies r and returns the summary of the valid prefix and its
// length in bytes (where Open truncates a partial last line).
func readChain(r io.Reader, fn func(Record) error) (Summary, int64, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	s := Summary{Last: Genesis}
	var end int64
	for lineNo := 1; ; lineNo++ {
		line, complete, err := readLine(br)
		if err != nil {
			return s, end, fmt.Errorf("read audit log: %w", err)
		}
		if len(line) == 0 && !complete {
			return s, end, nil // clean end of file
		}
		if len(line) > MaxLineSize {
			return s, end, tampered(lineNo, 0, fmt.Sprintf("line longer than %d bytes", MaxLineSize))
		}
		if !complete {
			return s, end, &ChainError{Line: lineNo, Err: ErrTruncated,
				Reason: fmt.Sprintf("incomplete last line (%d bytes without newline; crash during an append?)", len(line))}
		}
		rec, err := check(line, lineNo, uint64(s.Records)+1, s.Last)
		if err != nil {
			return s, end, err
		}
		if fn != nil {
			if err := fn(rec); err != nil {
				return s, end, err
			}
		}
		s.Records++
		s.Last = lineHash(line)
		end += int64(len(line)) + 1
	}
}

// check verifies one complete line against the expected seq and prev.
func check(line []byte, lineNo int, wantSeq uint64, prev string) (Record, error) {
	var rec Record
	if err := json.Unmarshal(line, &rec); err != nil {
		return rec, tampered(lineNo, 0, "not a JSON record")
	}
	canon, err := json.Marshal(rec)
	if err != nil || !bytes.Equal(canon, line) {
		return rec, tampered(lineNo, rec.Seq, "not in canonical form (edited?)")
	}
	_, hash, err := encode(rec)
	switch {
	case err != nil:
		return rec, tampered(lineNo, rec.Seq, "cannot be encoded")
	case rec.Hash == "":
		return rec, tampered(lineNo, rec.Seq, "no hash")
	case rec.Hash != hash:
		return rec, tampered(lineNo, rec.Seq, "hash mismatch (edited?)")
	case rec.Prev != prev && wantSeq == 1:
		return rec, tampered(lineNo, rec.Seq, "prev is not the genesis value (records deleted from the start?)")
	case rec.Prev != prev:
		return rec, tampered(lineNo, rec.Seq, fmt.Sprintf("prev does not match record %d (deleted or reordered?)", wantSeq-1))
	case rec.Seq != wantSeq:
		return rec, tampered(lineNo, rec.Seq, fmt.Sprintf("seq %d, want %d (deleted, duplicated or reordered?)", rec.Seq, wantSeq))
	}
	return rec, nil
}

func tampered(line int, seq uint64, reason string) error {
	return &ChainError{Line: line, Seq: seq, Reason: reason, Err: ErrTampered}
}

// readLine returns the next line without its newline, and whether the
// newline was there. Lines longer than MaxLineSize are cut at
// MaxLineSize+1 bytes (the rest is not read), which keeps memory bounded
// on hostile input; the caller reports them.
func readLine(br *bufio.Reader) (line []byte, complete bool, err error) {
	for {
		chunk, err := br.ReadSlice('\n')
		if len(line)+len(chunk) > MaxLineSize+1 {
			return append(line, chunk[:MaxLineSize+1-len(line)]...), true, nil
		}
		line = append(line, chunk...)
		switch {
		case err == nil:
			return line[:len(line)-1], true, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF):
			return line, false, nil
		default:
			return nil, false, err
		}
	}
}
