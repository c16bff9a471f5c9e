package attest

import (
	"bytes"
	"crypto"
	"encoding/binary"
	"fmt"
	"strings"
)

// Limits of the event-log parser.
const (
	maxEventLogSize  = 16 << 20
	maxEventDataSize = 1 << 20
	maxEvents        = 100000
	// maxPCRIndex bounds the PCR of a measured event (TPM 2.0 PC Client
	// TPMs have 24 PCRs; the parser tolerates up to 32).
	maxPCRIndex = 31
)

// EventType is a TCG PC Client event type.
type EventType uint32

// Event types used by the rules (TCG PC Client PFP spec, section 10.4.1).
const (
	EvPrebootCert              EventType = 0x0
	EvPostCode                 EventType = 0x1
	EvNoAction                 EventType = 0x3
	EvSeparator                EventType = 0x4
	EvAction                   EventType = 0x5
	EvEventTag                 EventType = 0x6
	EvSCRTMContents            EventType = 0x7
	EvSCRTMVersion             EventType = 0x8
	EvCPUMicrocode             EventType = 0x9
	EvPlatformConfigFlags      EventType = 0xa
	EvTableOfDevices           EventType = 0xb
	EvCompactHash              EventType = 0xc
	EvIPL                      EventType = 0xd
	EvIPLPartitionData         EventType = 0xe
	EvNonhostCode              EventType = 0xf
	EvNonhostConfig            EventType = 0x10
	EvNonhostInfo              EventType = 0x11
	EvOmitBootDeviceEvents     EventType = 0x12
	EvEFIVariableDriverConfig  EventType = 0x80000001
	EvEFIVariableBoot          EventType = 0x80000002
	EvEFIBootServicesApp       EventType = 0x80000003
	EvEFIBootServicesDriver    EventType = 0x80000004
	EvEFIRuntimeServicesDriver EventType = 0x80000005
	EvEFIGPTEvent              EventType = 0x80000006
	EvEFIAction                EventType = 0x80000007
	EvEFIPlatformFirmwareBlob  EventType = 0x80000008
	EvEFIHandoffTables         EventType = 0x80000009
	EvEFIPlatformFirmwareBlob2 EventType = 0x8000000a
	EvEFIHandoffTables2        EventType = 0x8000000b
	EvEFIVariableBoot2         EventType = 0x8000000c
	EvEFIHCRTMEvent            EventType = 0x80000010
	EvEFIVariableAuthority     EventType = 0x800000e0
)

var eventTypeNames = map[EventType]string{
	EvPrebootCert: "EV_PREBOOT_CERT", EvPostCode: "EV_POST_CODE", 0x2: "EV_UNUSED", EvNoAction: "EV_NO_ACTION",
	EvSeparator: "EV_SEPARATOR", EvAction: "EV_ACTION", EvEventTag: "EV_EVENT_TAG", EvSCRTMContents: "EV_S_CRTM_CONTENTS",
	EvSCRTMVersion: "EV_S_CRTM_VERSION", EvCPUMicrocode: "EV_CPU_MICROCODE", EvPlatformConfigFlags: "EV_PLATFORM_CONFIG_FLAGS",
	EvTableOfDevices: "EV_TABLE_OF_DEVICES", EvCompactHash: "EV_COMPACT_HASH", EvIPL: "EV_IPL", EvIPLPartitionData: "EV_IPL_PARTITION_DATA",
	EvNonhostCode: "EV_NONHOST_CODE", EvNonhostConfig: "EV_NONHOST_CONFIG", EvNonhostInfo: "EV_NONHOST_INFO",
	EvOmitBootDeviceEvents: "EV_OMIT_BOOT_DEVICE_EVENTS", EvEFIVariableDriverConfig: "EV_EFI_VARIABLE_DRIVER_CONFIG",
	EvEFIVariableBoot: "EV_EFI_VARIABLE_BOOT", EvEFIBootServicesApp: "EV_EFI_BOOT_SERVICES_APPLICATION",
	EvEFIBootServicesDriver: "EV_EFI_BOOT_SERVICES_DRIVER", EvEFIRuntimeServicesDriver: "EV_EFI_RUNTIME_SERVICES_DRIVER",
	EvEFIGPTEvent: "EV_EFI_GPT_EVENT", EvEFIAction: "EV_EFI_ACTION", EvEFIPlatformFirmwareBlob: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
	EvEFIHandoffTables: "EV_EFI_HANDOFF_TABLES", EvEFIPlatformFirmwareBlob2: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
	EvEFIHandoffTables2: "EV_EFI_HANDOFF_TABLES2", EvEFIVariableBoot2: "EV_EFI_VARIABLE_BOOT2", EvEFIHCRTMEvent: "EV_EFI_HCRTM_EVENT",
	EvEFIVariableAuthority: "EV_EFI_VARIABLE_AUTHORITY",
}

func (t EventType) String() string {
	if n, ok := eventTypeNames[t]; ok {
		return n
	}
	return fmt.Sprintf("EV_0x%x", uint32(t))
}

// Bank names a PCR bank by its hash: "sha1", "sha256", "sha384", "sha512".
type Bank string

// TPM algorithm IDs of the supported banks.
const (
	algSHA1   uint16 = 0x0004
	algSHA256 uint16 = 0x000b
	algSHA384 uint16 = 0x000c
	algSHA512 uint16 = 0x000d
)

func bankForAlg(alg uint16) (Bank, crypto.Hash, bool) {
	switch alg {
	case algSHA1:
		return "sha1", crypto.SHA1, true
	case algSHA256:
		return "sha256", crypto.SHA256, true
	case algSHA384:
		return "sha384", crypto.SHA384, true
	case algSHA512:
		return "sha512", crypto.SHA512, true
	}
	return "", 0, false
}

// Hash returns the hash function of a bank.
func (b Bank) Hash() (crypto.Hash, bool) {
	switch b {
	case "sha1":
		return crypto.SHA1, true
	case "sha256":
		return crypto.SHA256, true
	case "sha384":
		return crypto.SHA384, true
	case "sha512":
		return crypto.SHA512, true
	}
	return 0, false
}

// Event is one measured event.
type Event struct {
	Index   int // position in the log, 0-based
	PCR     int
	Type    EventType
	Digests map[Bank][]byte // per supported bank
	Data    []byte
}

// EventLog is a parsed TCG PC Client event log.
type EventLog struct {
	CryptoAgile bool
	Banks       []Bank // banks the log carries, in SpecID order
	Events      []Event
	// startupLocality is the locality from the StartupLocality EV_NO_ACTION
	// event on PCR 0; it sets the initial value of PCR 0.
	startupLocality byte
	// hcrtm is true when the first measurement in PCR 0 is an
	// EV_EFI_HCRTM_EVENT: the H-CRTM sequence ran before TPM2_Startup, and
	// PCR 0 started at 4 (locality 4) in every bank.
	hcrtm       bool
	unknownAlgs []uint16 // banks present in the log that cannot be replayed
}

// hcrtmLocality is the initial last octet of PCR 0 after an H-CRTM
// sequence (TPM 2.0 Part 1, H-CRTM before TPM2_Startup: the PCR is reset
// to the locality 4 value before the H-CRTM digest is extended).
const hcrtmLocality = 4

// PCR0Locality returns the locality PCR 0 starts from in the replay and
// why: 4 after an H-CRTM sequence, the StartupLocality event's value, or 0.
func (l *EventLog) PCR0Locality() (byte, string) {
	switch {
	case l.hcrtm:
		return hcrtmLocality, "H-CRTM: the first PCR 0 event is EV_EFI_HCRTM_EVENT"
	case l.startupLocality != 0:
		return l.startupLocality, "StartupLocality event"
	}
	return 0, "no StartupLocality or H-CRTM event"
}

// UnknownAlgorithms lists the digest algorithms the log declares but the
// parser does not know (for example SM3_256, 0x0012): their digests are
// skipped by their declared sizes and not replayed.
func (l *EventLog) UnknownAlgorithms() []uint16 { return append([]uint16(nil), l.unknownAlgs...) }

// replayNote describes the non-default parts of the replay, for
// explanations ("" when there are none).
func (l *EventLog) replayNote() string {
	var parts []string
	if loc, why := l.PCR0Locality(); loc != 0 {
		parts = append(parts, fmt.Sprintf("PCR 0 from locality %d (%s)", loc, why))
	}
	for _, a := range l.unknownAlgs {
		parts = append(parts, fmt.Sprintf("digest algorithm 0x%04x skipped (not replayed)", a))
	}
	if len(parts) == 0 {
		return ""
	}
	return "; " + strings.Join(parts, "; ")
}

// replayHint explains how PCR i was started, for a replay mismatch.
func (l *EventLog) replayHint(i int) string {
	if i != 0 {
		return ""
	}
	loc, why := l.PCR0Locality()
	return fmt.Sprintf(" (PCR 0 replayed from locality %d: %s)", loc, why)
}

func logErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrMalformedEventLog, fmt.Sprintf(format, args...))
}

// ParseEventLog parses a binary TCG event log: crypto-agile (first event is
// the "Spec ID Event03" EV_NO_ACTION) or legacy SHA-1-only. It is lenient
// about trailing padding (zero or 0xff bytes after the last event) but
// strict about anything that would change the replay.
func ParseEventLog(data []byte) (*EventLog, error) {
	if len(data) > maxEventLogSize {
		return nil, logErr("%d bytes exceeds the %d-byte limit", len(data), maxEventLogSize)
	}
	if len(data) < 32 {
		return nil, logErr("too short (%d bytes)", len(data))
	}
	log := &EventLog{}
	// The first event always has the legacy TCG_PCR_EVENT format.
	first, rest, err := readLegacyEvent(data, 0)
	if err != nil {
		return nil, err
	}
	sizes := map[uint16]int{}
	if first.Type == EvNoAction && bytes.HasPrefix(first.Data, []byte("Spec ID Event03\x00")) {
		log.CryptoAgile = true
		if err := log.parseSpecID(first.Data, sizes); err != nil {
			return nil, err
		}
	} else {
		log.Banks = []Bank{"sha1"}
		log.Events = append(log.Events, first)
	}
	for idx := 1; len(rest) > 0; idx++ {
		if isPadding(rest) {
			break
		}
		if idx > maxEvents {
			return nil, logErr("more than %d events", maxEvents)
		}
		var ev Event
		if log.CryptoAgile {
			ev, rest, err = log.readAgileEvent(rest, idx, sizes)
		} else {
			ev, rest, err = readLegacyEvent(rest, idx)
		}
		if err != nil {
			return nil, err
		}
		if ev.Type == EvNoAction && ev.PCR == 0 && bytes.HasPrefix(ev.Data, []byte("StartupLocality\x00")) && len(ev.Data) >= 17 {
			log.startupLocality = ev.Data[16]
		}
		log.Events = append(log.Events, ev)
	}
	if err := log.findHCRTM(); err != nil {
		return nil, err
	}
	return log, nil
}

// findHCRTM sets hcrtm when the first measurement extended into PCR 0 is an
// EV_EFI_HCRTM_EVENT. An H-CRTM event anywhere else in PCR 0 cannot be
// replayed (the H-CRTM sequence runs before TPM2_Startup, so it is the
// first PCR 0 measurement or none): the log is refused.
func (l *EventLog) findHCRTM() error {
	first := true
	for _, ev := range l.Events {
		if ev.PCR != 0 || ev.Type == EvNoAction {
			continue
		}
		if ev.Type == EvEFIHCRTMEvent {
			if !first {
				return logErr("event %d: EV_EFI_HCRTM_EVENT is not the first measurement in PCR 0", ev.Index)
			}
			l.hcrtm = true
		}
		first = false
	}
	return nil
}

// checkPCRIndex refuses a measured event outside the PCRs a TPM can have.
// EV_NO_ACTION events are never extended, so their index is not a PCR
// (Windows logs carry some on 0xFFFFFFFF) and is not checked.
func checkPCRIndex(ev *Event) error {
	if ev.Type != EvNoAction && ev.PCR > maxPCRIndex {
		return logErr("event %d: %s extends PCR index %d, out of range 0..%d", ev.Index, ev.Type, ev.PCR, maxPCRIndex)
	}
	return nil
}

func isPadding(b []byte) bool {
	return len(bytes.Trim(b, "\x00")) == 0 || len(bytes.Trim(b, "\xff")) == 0
}

func readLegacyEvent(b []byte, idx int) (Event, []byte, error) {
	if len(b) < 32 {
		return Event{}, nil, logErr("event %d: truncated header", idx)
	}
	ev := Event{Index: idx, PCR: int(binary.LittleEndian.Uint32(b)), Type: EventType(binary.LittleEndian.Uint32(b[4:]))}
	ev.Digests = map[Bank][]byte{"sha1": append([]byte(nil), b[8:28]...)}
	n := binary.LittleEndian.Uint32(b[28:])
	if n > maxEventDataSize || int(n) > len(b)-32 {
		return Event{}, nil, logErr("event %d: data size %d exceeds the remaining %d bytes", idx, n, len(b)-32)
	}
	if err := checkPCRIndex(&ev); err != nil {
		return Event{}, nil, err
	}
	ev.Data = append([]byte(nil), b[32:32+n]...)
	return ev, b[32+n:], nil
}

func (l *EventLog) parseSpecID(d []byte, sizes map[uint16]int) error {
	// signature[16] platformClass u32 minor u8 major u8 errata u8 uintnSize u8 numAlgs u32
	if len(d) < 28 {
		return logErr("Spec ID event truncated")
	}
	n := binary.LittleEndian.Uint32(d[24:])
	if n == 0 || n > 16 || len(d) < 28+int(n)*4 {
		return logErr("Spec ID event: bad algorithm count %d", n)
	}
	for i := 0; i < int(n); i++ {
		alg := binary.LittleEndian.Uint16(d[28+4*i:])
		size := int(binary.LittleEndian.Uint16(d[30+4*i:]))
		if size == 0 || size > 64 {
			return logErr("Spec ID event: bad digest size %d for algorithm 0x%04x", size, alg)
		}
		if _, dup := sizes[alg]; dup {
			return logErr("Spec ID event: algorithm 0x%04x listed twice", alg)
		}
		sizes[alg] = size
		if bank, h, ok := bankForAlg(alg); ok {
			if h.Size() != size {
				return logErr("Spec ID event: %s digest size %d, want %d", bank, size, h.Size())
			}
			l.Banks = append(l.Banks, bank)
		} else {
			l.unknownAlgs = append(l.unknownAlgs, alg)
		}
	}
	return nil
}

func (l *EventLog) readAgileEvent(b []byte, idx int, sizes map[uint16]int) (Event, []byte, error) {
	if len(b) < 12 {
		return Event{}, nil, logErr("event %d: truncated header", idx)
	}
	ev := Event{Index: idx, PCR: int(binary.LittleEndian.Uint32(b)), Type: EventType(binary.LittleEndian.Uint32(b[4:])), Digests: map[Bank][]byte{}}
	if err := checkPCRIndex(&ev); err != nil {
		return Event{}, nil, err
	}
	count := binary.LittleEndian.Uint32(b[8:])
	if count > uint32(len(sizes)) {
		return Event{}, nil, logErr("event %d: %d digests, the log declares %d algorithms", idx, count, len(sizes))
	}
	b = b[12:]
	for i := uint32(0); i < count; i++ {
		if len(b) < 2 {
			return Event{}, nil, logErr("event %d: truncated digest", idx)
		}
		alg := binary.LittleEndian.Uint16(b)
		size, ok := sizes[alg]
		if !ok {
			return Event{}, nil, logErr("event %d: digest algorithm 0x%04x not declared in the Spec ID event", idx, alg)
		}
		if len(b) < 2+size {
			return Event{}, nil, logErr("event %d: truncated digest", idx)
		}
		if bank, _, ok := bankForAlg(alg); ok {
			if _, dup := ev.Digests[bank]; dup {
				return Event{}, nil, logErr("event %d: two %s digests", idx, bank)
			}
			ev.Digests[bank] = append([]byte(nil), b[2:2+size]...)
		}
		b = b[2+size:]
	}
	if len(b) < 4 {
		return Event{}, nil, logErr("event %d: truncated event size", idx)
	}
	n := binary.LittleEndian.Uint32(b)
	if n > maxEventDataSize || int(n) > len(b)-4 {
		return Event{}, nil, logErr("event %d: data size %d exceeds the remaining %d bytes", idx, n, len(b)-4)
	}
	ev.Data = append([]byte(nil), b[4:4+n]...)
	return ev, b[4+n:], nil
}

// Describe returns a short printable description of the event data.
func (e *Event) Describe() string {
	switch e.Type {
	case EvEFIVariableDriverConfig, EvEFIVariableBoot, EvEFIVariableBoot2, EvEFIVariableAuthority:
		if v, err := parseEFIVariable(e.Data); err == nil {
			return v.Name
		}
	case EvEFIAction, EvAction, EvSCRTMVersion, EvIPL, EvPostCode, EvEFIHCRTMEvent:
		s := strings.Map(func(r rune) rune {
			if r < 0x20 || r > 0x7e {
				return -1
			}
			return r
		}, string(e.Data))
		if len(s) > 60 {
			s = s[:60] + "..."
		}
		return s
	}
	return fmt.Sprintf("%d bytes", len(e.Data))
}
