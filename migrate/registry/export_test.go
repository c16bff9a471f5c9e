package registry

// CrashForTest stops the client as a crashed host would: the keep-alive
// stops and the connection closes, but the lease is not revoked, so the
// host stays live until its lease expires.
func (c *Client) CrashForTest() {
	c.closed.Store(true)
	c.stop()
	c.wg.Wait()
	c.cli.Close()
	if c.member != nil {
		c.member.Close()
	}
	c.once.Do(func() {})
}

// DecodeStateForTest exposes the host state decoder to the fuzz target.
func DecodeStateForTest(b []byte) (HostState, error) { return decodeState(b) }

// StateValueForTest is the canonical state record.
func StateValueForTest(s HostState) string { return stateValue(s) }
