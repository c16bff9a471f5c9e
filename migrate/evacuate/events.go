package evacuate

import (
	"encoding/json"
	"io"
	"sync"
	"time"
)

// EventSchema is the version of the event schema (the "v" field).
const EventSchema = 1

// EventType discriminates events (the "type" field).
type EventType string

// Event types, documented with their fields in docs/evacuation.md.
const (
	EventPlan        EventType = "plan"         // the plan: every VM's destination, every host left out
	EventVMPhase     EventType = "vm-phase"     // a VM entered a phase, or its bytes moved on
	EventVMDone      EventType = "vm-done"      // a VM's outcome in this run
	EventHostRefused EventType = "host-refused" // a destination was refused by attestation
	EventHostFailed  EventType = "host-failed"  // a destination failed, or the registry refused moves to it
	EventReport      EventType = "report"       // the report; the last event
)

// Event is one line of NDJSON. Which fields are set depends on Type.
type Event struct {
	V      int       `json:"v"`
	Type   EventType `json:"type"`
	Time   time.Time `json:"time"`
	Source string    `json:"source"`

	// plan
	Plan    *Plan `json:"plan,omitempty"`
	DryRun  bool  `json:"dry_run,omitempty"`
	Resumed bool  `json:"resumed,omitempty"`

	// vm-phase, vm-done
	VM        string `json:"vm,omitempty"`
	Name      string `json:"name,omitempty"`
	Dest      string `json:"dest,omitempty"`
	Phase     Phase  `json:"phase,omitempty"`
	Bytes     uint64 `json:"bytes,omitempty"`
	Total     uint64 `json:"total,omitempty"`
	ElapsedMS int64  `json:"elapsed_ms,omitempty"`
	Detail    string `json:"detail,omitempty"`
	// vm-done
	Result *VMReport `json:"result,omitempty"`

	// host-refused, host-failed
	Host      string `json:"host,omitempty"`
	Rule      string `json:"rule,omitempty"`
	Replanned int    `json:"replanned,omitempty"`

	// report
	Report *Report `json:"report,omitempty"`
}

// Sink receives events, one at a time (the runner serialises them).
type Sink interface {
	Event(Event)
}

// SinkFunc adapts a function to a Sink.
type SinkFunc func(Event)

// Event implements Sink.
func (f SinkFunc) Event(e Event) { f(e) }

// Sinks fans events out to several sinks.
type Sinks []Sink

// Event implements Sink.
func (s Sinks) Event(e Event) {
	for _, x := range s {
		if x != nil {
			x.Event(e)
		}
	}
}

// JSONSink writes each event as one line of JSON (NDJSON, for --json).
type JSONSink struct {
	mu  sync.Mutex
	enc *json.Encoder
	err error
}

// NewJSONSink writes events to w.
func NewJSONSink(w io.Writer) *JSONSink { return &JSONSink{enc: json.NewEncoder(w)} }

// Event implements Sink.
func (s *JSONSink) Event(e Event) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		s.err = s.enc.Encode(e)
	}
}

// Err returns the first write error, if any.
func (s *JSONSink) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}
