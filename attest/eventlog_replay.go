package attest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"unicode/utf16"
)

// PCRValues maps bank → PCR index → value.
type PCRValues map[Bank]map[int][]byte

// Replay computes the final value of every PCR the log extends, per bank the
// log carries. EV_NO_ACTION events are not extended (whatever their PCR
// index). PCR 0 starts at 00..04 in every bank when the first PCR 0 event is
// EV_EFI_HCRTM_EVENT (H-CRTM before TPM2_Startup), else at the
// StartupLocality value when the log has one; PCRs 17-22 start at 0xff..
// (they are only reset by a dynamic launch).
func (l *EventLog) Replay() PCRValues {
	out := PCRValues{}
	locality, _ := l.PCR0Locality()
	for _, bank := range l.Banks {
		h, _ := bank.Hash()
		vals := map[int][]byte{}
		for _, ev := range l.Events {
			if ev.Type == EvNoAction {
				continue
			}
			d, ok := ev.Digests[bank]
			if !ok {
				continue
			}
			cur, ok := vals[ev.PCR]
			if !ok {
				cur = initialPCR(ev.PCR, h.Size(), locality)
			}
			hh := h.New()
			hh.Write(cur)
			hh.Write(d)
			vals[ev.PCR] = hh.Sum(nil)
		}
		out[bank] = vals
	}
	return out
}

func initialPCR(pcr, size int, locality byte) []byte {
	v := make([]byte, size)
	switch {
	case pcr >= 17 && pcr <= 22:
		for i := range v {
			v[i] = 0xff
		}
	case pcr == 0:
		v[size-1] = locality
	}
	return v
}

// PCRs returns the sorted PCR indices present in a bank.
func (v PCRValues) PCRs(bank Bank) []int {
	var out []int
	for i := range v[bank] {
		out = append(out, i)
	}
	sort.Ints(out)
	return out
}

// BootFacts are the facts the rules read from a replayed log.
type BootFacts struct {
	// SecureBoot is the value of the SecureBoot variable measured in PCR 7
	// (nil when the log does not measure it).
	SecureBoot *bool
	// BootComponents are the EV_EFI_BOOT_SERVICES_APPLICATION events (PCR 4):
	// the boot loaders, shims and kernels loaded by the firmware.
	BootComponents []Event
	// Separators lists the PCRs that received an EV_SEPARATOR.
	Separators []int
}

// EFIVariable is a decoded UEFI_VARIABLE_DATA.
type EFIVariable struct {
	GUID [16]byte
	Name string
	Data []byte
}

var efiGlobalVariable = [16]byte{0x61, 0xdf, 0xe4, 0x8b, 0xca, 0x93, 0xd2, 0x11, 0xaa, 0x0d, 0x00, 0xe0, 0x98, 0x03, 0x2b, 0x8c}

func parseEFIVariable(b []byte) (EFIVariable, error) {
	var v EFIVariable
	if len(b) < 32 {
		return v, errors.New("UEFI_VARIABLE_DATA truncated")
	}
	copy(v.GUID[:], b)
	nameLen := binary.LittleEndian.Uint64(b[16:])
	dataLen := binary.LittleEndian.Uint64(b[24:])
	if nameLen > 1024 || dataLen > uint64(len(b)) || 32+2*nameLen+dataLen > uint64(len(b)) {
		return v, errors.New("UEFI_VARIABLE_DATA lengths exceed the event")
	}
	u := make([]uint16, nameLen)
	for i := range u {
		u[i] = binary.LittleEndian.Uint16(b[32+2*i:])
	}
	v.Name = string(utf16.Decode(u))
	off := 32 + 2*nameLen
	v.Data = b[off : off+dataLen]
	return v, nil
}

// Facts extracts the BootFacts. The SecureBoot event's data must hash to
// its digests in every bank (the digest is what the quote covers; the data
// is only trusted when it matches).
func (l *EventLog) Facts() (BootFacts, error) {
	var f BootFacts
	seen := map[int]bool{}
	for i := range l.Events {
		ev := &l.Events[i]
		switch ev.Type {
		case EvSeparator:
			if !seen[ev.PCR] {
				seen[ev.PCR] = true
				f.Separators = append(f.Separators, ev.PCR)
			}
		case EvEFIBootServicesApp:
			if ev.PCR == 4 {
				f.BootComponents = append(f.BootComponents, *ev)
			}
		case EvEFIVariableDriverConfig:
			if ev.PCR != 7 {
				continue
			}
			v, err := parseEFIVariable(ev.Data)
			if err != nil || v.Name != "SecureBoot" || v.GUID != efiGlobalVariable {
				continue
			}
			for bank, d := range ev.Digests {
				h, _ := bank.Hash()
				hh := h.New()
				hh.Write(ev.Data)
				if !bytes.Equal(hh.Sum(nil), d) {
					return f, fmt.Errorf("%w: event %d (SecureBoot variable): %s digest does not match the event data", ErrMalformedEventLog, ev.Index, bank)
				}
			}
			on := len(v.Data) > 0 && v.Data[0] == 1
			f.SecureBoot = &on
		}
	}
	sort.Ints(f.Separators)
	return f, nil
}
