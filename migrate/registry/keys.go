package registry

// DefaultPrefix is the key prefix of every record. Hosts' etcd users may
// touch nothing outside it (Bootstrap).
const DefaultPrefix = "/vtpmm/v1/"

// keys is the key layout: one place spells every key (docs/registry.md
// lists the same table).
//
//	hosts/HOST        Host        the host itself (Register)
//	state/HOST        stateRecord the operator (Enroll, SetState); canonical
//	live/HOST         liveRecord  the host, attached to its lease
//	enrol/HOST        Enrolment   the operator, once
//	vms/VM            VM          any owner through CAS; canonical
//	standby/VM/HOST   Standby     standby hosts and owners
//	evac/HOST         Plan        the operator's evacuation of HOST
type keys struct{ prefix string }

func (k keys) host(h string) string  { return k.prefix + "hosts/" + h }
func (k keys) hosts() string         { return k.prefix + "hosts/" }
func (k keys) state(h string) string { return k.prefix + "state/" + h }
func (k keys) states() string        { return k.prefix + "state/" }
func (k keys) live(h string) string  { return k.prefix + "live/" + h }
func (k keys) lives() string         { return k.prefix + "live/" }
func (k keys) enrol(h string) string { return k.prefix + "enrol/" + h }
func (k keys) enrols() string        { return k.prefix + "enrol/" }
func (k keys) vm(id string) string   { return k.prefix + "vms/" + id }
func (k keys) vms() string           { return k.prefix + "vms/" }
func (k keys) standbys(vm string) string {
	return k.prefix + "standby/" + vm + "/"
}
func (k keys) standby(vm, h string) string { return k.standbys(vm) + h }
func (k keys) standbyAll() string          { return k.prefix + "standby/" }
func (k keys) plan(h string) string        { return k.prefix + "evac/" + h }
func (k keys) plans() string               { return k.prefix + "evac/" }
