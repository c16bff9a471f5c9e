package audit

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// Event names what a record records. Other event names than the constants
// are accepted if they are lowercase words joined by hyphens.
type Event string

// Events vtpmd logs.
const (
	EventKeyRelease        Event = "key-release"         // a source released a VM key to a destination
	EventKeyReleaseRefused Event = "key-release-refused" // a destination failed attestation
	EventKeyReceived       Event = "key-received"        // a destination holds a VM key as PENDING
	EventMigrationCommit   Event = "migration-commit"
	EventMigrationAbort    Event = "migration-abort"
	EventHostEnrolled      Event = "host-enrolled"  // a peer's EK and AK were verified and recorded
	EventEnrollRefused     Event = "enroll-refused" // a peer's EK or AK was refused
	EventBackup            Event = "backup"
	EventRestore           Event = "restore"
	EventStartRefused      Event = "start-refused"       // a VM's start was refused (the fleet registry disagrees)
	EventStaleShredded     Event = "stale-copy-shredded" // a stale copy was shredded after its owner confirmed a newer one
	EventRegistryRaised    Event = "registry-raised"     // the registry was older than this host's copy and was raised (Bump)
	EventRekey             Event = "vm-rekey"            // a VM's key was replaced and its vTPM state re-encrypted
	EventAnchorAccept      Event = "anchor-accept"       // an operator accepted the data directory after a refusal
	EventReplica           Event = "standby-replica"     // a standby stored a VM's replica at a new generation (issue 15)
	EventReplicaDropped    Event = "standby-replica-dropped"
	EventFenced            Event = "host-fenced"       // a host was fenced (fence agent, or the operator's confirmation) before a failover
	EventPromoted          Event = "failover-promoted" // a standby promoted its replica: it owns the VM at a new generation
	EventFailoverRefused   Event = "failover-refused"
)

// Genesis is the prev value of the first record: 64 zeros.
const Genesis = "0000000000000000000000000000000000000000000000000000000000000000"

// MaxLineSize bounds one record line (without its newline). Append refuses
// longer records; Verify reports longer lines as tampering.
const MaxLineSize = 64 << 10

// Record is one audit event. Append sets Seq, Time, Host, Prev and Hash;
// the caller fills the rest. Empty fields are written as "" or 0.
type Record struct {
	Seq        uint64    `json:"seq"`
	Time       time.Time `json:"time"`
	Host       string    `json:"host"`  // the host that wrote the log
	Event      Event     `json:"event"` // one of the Event constants
	VM         string    `json:"vm"`    // VM UUID
	Peer       string    `json:"peer"`  // the other host (destination of a release)
	Generation uint64    `json:"generation"`
	Rule       string    `json:"rule"`   // the attestation rule of a refusal
	Detail     string    `json:"detail"` // free text; never key material
	Prev       string    `json:"prev"`
	Hash       string    `json:"hash,omitempty"`
}

// encode returns the canonical line of r (with its hash member as set)
// and the hash over the canonical encoding without the hash member.
func encode(r Record) (line []byte, hash string, err error) {
	r.Hash = ""
	body, err := json.Marshal(r)
	if err != nil {
		return nil, "", fmt.Errorf("encode record: %w", err)
	}
	sum := sha256.Sum256(body)
	r.Hash = hex.EncodeToString(sum[:])
	line, err = json.Marshal(r)
	if err != nil {
		return nil, "", fmt.Errorf("encode record: %w", err)
	}
	return line, r.Hash, nil
}

// lineHash is what the next record carries as prev.
func lineHash(line []byte) string {
	sum := sha256.Sum256(line)
	return hex.EncodeToString(sum[:])
}

// validEvent accepts lowercase words joined by single hyphens.
func validEvent(e Event) bool {
	if e == "" || len(e) > 64 || e[0] == '-' || e[len(e)-1] == '-' || strings.Contains(string(e), "--") {
		return false
	}
	for _, c := range e {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}
