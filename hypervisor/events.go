package hypervisor

import "context"

// EventType is the type of a domain lifecycle event, named as 'virsh
// event' names libvirt's VIR_DOMAIN_EVENT_* types.
type EventType string

// Lifecycle event types.
const (
	EventDefined     EventType = "defined"
	EventUndefined   EventType = "undefined"
	EventStarted     EventType = "started"
	EventSuspended   EventType = "suspended"
	EventResumed     EventType = "resumed"
	EventStopped     EventType = "stopped"
	EventShutdown    EventType = "shutdown"
	EventPMSuspended EventType = "pmsuspended"
	EventCrashed     EventType = "crashed"
)

// EventDetail is an event's reason ("migrated", "booted", "destroyed",
// ...); an unnamed detail is its number.
type EventDetail string

// DetailMigrated is the detail of the events around a migration.
const DetailMigrated EventDetail = "migrated"

// LifecycleEvent is one domain lifecycle event.
type LifecycleEvent struct {
	VM     string // domain UUID
	Name   string // domain name
	Event  EventType
	Detail EventDetail
}

// LifecycleWatcher is a hypervisor that reports domain lifecycle events
// (hypervisor/libvirt). WatchLifecycle delivers them to fn, one at a time,
// until ctx ends; events may be lost while it reconnects.
type LifecycleWatcher interface {
	WatchLifecycle(ctx context.Context, fn func(LifecycleEvent)) error
}
