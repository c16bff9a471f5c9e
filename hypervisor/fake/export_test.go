package fake

// SetResumeByRestart makes a failed outgoing migration resume the source
// vTPM in a new swtpm process (the fallback path).
func SetResumeByRestart(h *Host, v bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.resumeByRestart = v
}
