package registrytest

import (
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
)

// Ports for test members come from below the kernel's ephemeral range
// (32768-60999 on Linux): a port picked with ":0" and closed again is
// from that range, where any outgoing connection of a busy test run (gRPC,
// HTTP) may take it before etcd binds it ("bind: address already in use",
// seen in make test). Below it, only another test picking the same port
// can, which the check here makes rare.
const (
	portLow  = 20000
	portHigh = 32000
)

// FreeAddr returns a loopback address whose port was free a moment ago,
// outside the ephemeral range.
func FreeAddr() (string, error) {
	var last error
	for range 100 {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(portLow+rand.IntN(portHigh-portLow)))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			last = err
			continue
		}
		l.Close()
		return addr, nil
	}
	return "", fmt.Errorf("no free loopback port in %d-%d: %w", portLow, portHigh, last)
}
