package emuhost

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"
)

// cmdShutdown is swtpm's CMD_SHUTDOWN control command (tpm_ioctl.h).
const cmdShutdown = 3

// ctrlCommand sends one argument-less command on swtpm's control channel and
// checks the 4-byte TPM result. The full protocol lives in vtpm/swtpm.
func ctrlCommand(ctx context.Context, sock string, cmd uint32) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", sock)
	if err != nil {
		return fmt.Errorf("swtpm ctrl %d: %w", cmd, err)
	}
	defer c.Close()
	dl := time.Now().Add(5 * time.Second)
	if d, ok := ctx.Deadline(); ok && d.Before(dl) {
		dl = d
	}
	_ = c.SetDeadline(dl)
	var req [4]byte
	binary.BigEndian.PutUint32(req[:], cmd)
	if _, err := c.Write(req[:]); err != nil {
		return fmt.Errorf("swtpm ctrl %d: %w", cmd, err)
	}
	var rsp [4]byte
	if _, err := io.ReadFull(c, rsp[:]); err != nil {
		return fmt.Errorf("swtpm ctrl %d: %w", cmd, err)
	}
	if rc := binary.BigEndian.Uint32(rsp[:]); rc != 0 {
		return fmt.Errorf("swtpm ctrl %d: TPM result 0x%x", cmd, rc)
	}
	return nil
}
