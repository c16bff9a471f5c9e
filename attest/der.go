package attest

import (
	"encoding/asn1"
	"errors"
)

// A minimal DER/BER TLV reader for the lenient certificate parser. It only
// handles single-byte tags and definite lengths (all X.509 needs) and never
// checks INTEGER minimality.

const (
	tagBoolean     = 0x01
	tagInteger     = 0x02
	tagBitString   = 0x03
	tagOctetString = 0x04
	tagOID         = 0x06
	tagUTCTime     = 0x17
	tagGenTime     = 0x18
	tagSequence    = 0x30
)

var errDER = errors.New("bad DER")

type derElem struct {
	tag     byte
	content []byte
	full    []byte // tag + length + content
}

// readDER reads one element from b and returns it and the remaining bytes.
func readDER(b []byte) (derElem, []byte, error) {
	if len(b) < 2 {
		return derElem{}, nil, errDER
	}
	tag := b[0]
	if tag&0x1f == 0x1f { // multi-byte tag: not used in certificates
		return derElem{}, nil, errDER
	}
	l := int(b[1])
	hdr := 2
	if l&0x80 != 0 {
		n := l & 0x7f
		if n == 0 || n > 4 || len(b) < 2+n {
			return derElem{}, nil, errDER
		}
		l = 0
		for i := 0; i < n; i++ {
			l = l<<8 | int(b[2+i])
		}
		hdr += n
		if l < 0 {
			return derElem{}, nil, errDER
		}
	}
	if l > len(b)-hdr {
		return derElem{}, nil, errDER
	}
	end := hdr + l
	return derElem{tag: tag, content: b[hdr:end], full: b[:end]}, b[end:], nil
}

// expect reads one element with the given tag.
func expect(b []byte, tag byte) (derElem, []byte, error) {
	e, rest, err := readDER(b)
	if err != nil {
		return e, nil, err
	}
	if e.tag != tag {
		return e, nil, errDER
	}
	return e, rest, nil
}

// optional reads an element with tag if it is next; ok reports its presence.
func optional(b []byte, tag byte) (e derElem, rest []byte, ok bool, err error) {
	if len(b) == 0 || b[0] != tag {
		return derElem{}, b, false, nil
	}
	e, rest, err = readDER(b)
	return e, rest, err == nil, err
}

func parseOID(e derElem) (asn1.ObjectIdentifier, error) {
	var oid asn1.ObjectIdentifier
	rest, err := asn1.Unmarshal(e.full, &oid)
	if err != nil || len(rest) != 0 {
		return nil, errDER
	}
	return oid, nil
}

// bitStringBytes returns the bytes of a BIT STRING content (ignoring the
// unused-bits count, which is 0 for keys and signatures).
func bitStringBytes(e derElem) ([]byte, error) {
	if e.tag != tagBitString || len(e.content) < 1 {
		return nil, errDER
	}
	return e.content[1:], nil
}
