package swtpm

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"
)

// Command is an swtpm control-channel command code (swtpm's tpm_ioctl.h).
// On the socket control channel a command is its 4-byte big-endian code
// followed by the request structure; the response is the response
// structure, which starts with a 4-byte TPM result for all but
// CMD_GET_CAPABILITY.
type Command uint32

// Control-channel commands.
const (
	CmdGetCapability      Command = 1
	CmdInit               Command = 2
	CmdShutdown           Command = 3
	CmdGetTPMEstablished  Command = 4
	CmdSetLocality        Command = 5
	CmdHashStart          Command = 6
	CmdHashData           Command = 7
	CmdHashEnd            Command = 8
	CmdCancelTPMCmd       Command = 9
	CmdStoreVolatile      Command = 10
	CmdResetTPMEstablised Command = 11
	CmdGetStateBlob       Command = 12
	CmdSetStateBlob       Command = 13
	CmdStop               Command = 14
	CmdGetConfig          Command = 15
	CmdSetDataFD          Command = 16
	CmdSetBufferSize      Command = 17
)

func (c Command) String() string {
	switch c {
	case CmdGetCapability:
		return "CMD_GET_CAPABILITY"
	case CmdInit:
		return "CMD_INIT"
	case CmdShutdown:
		return "CMD_SHUTDOWN"
	case CmdStoreVolatile:
		return "CMD_STORE_VOLATILE"
	case CmdGetStateBlob:
		return "CMD_GET_STATEBLOB"
	case CmdSetStateBlob:
		return "CMD_SET_STATEBLOB"
	case CmdStop:
		return "CMD_STOP"
	case CmdGetConfig:
		return "CMD_GET_CONFIG"
	}
	return "CMD_" + strconv.Itoa(int(c))
}

// Capability bits of CMD_GET_CAPABILITY (PTM_CAP_*).
const (
	CapInit          = 0x0001
	CapShutdown      = 0x0002
	CapStoreVolatile = 0x0040
	CapGetStateBlob  = 0x0100
	CapSetStateBlob  = 0x0200
	CapStop          = 0x0400
	CapGetConfig     = 0x0800
)

// BlobType selects a state blob (PTM_BLOB_TYPE_*).
type BlobType uint32

// State blob types.
const (
	BlobPermanent BlobType = 1
	BlobVolatile  BlobType = 2
	BlobSaveState BlobType = 3
)

// State flags of CMD_GET_STATEBLOB / CMD_SET_STATEBLOB.
const (
	// stateFlagDecrypted asks for decrypted state (refused when a
	// migration key is set).
	stateFlagDecrypted = 1
	// stateFlagEncrypted marks a blob encrypted with the migration key.
	stateFlagEncrypted = 2
)

// InitFlagDeleteVolatile makes CMD_INIT delete the saved volatile state
// (PTM_INIT_FLAG_DELETE_VOLATILE).
const InitFlagDeleteVolatile = 1

// Config flags of CMD_GET_CONFIG.
const (
	ConfigFileKey      = 1 // the state files are encrypted (--key)
	ConfigMigrationKey = 2 // state blobs are encrypted (--migration-key)
)

// TPM results seen on the control channel.
const (
	rcDecryptError = 0x21 // TPM_DECRYPT_ERROR: wrong key
	rcBadOrdinal   = 0x0a // TPM_BAD_ORDINAL: command not allowed in this state (running / not running)
)

func hex32(v uint32) string { return fmt.Sprintf("0x%x", v) }

func resultText(c uint32) string {
	switch c {
	case rcDecryptError:
		return " (decryption error: wrong passphrase)"
	case rcBadOrdinal:
		return " (not allowed now: TPM running or not running)"
	case 0x03:
		return " (bad parameter)"
	case 0x09:
		return " (TPM failure)"
	case 0x101:
		return " (TPM_RC_FAILURE: libtpms could not load the state)"
	}
	return ""
}

// Blob is one state blob as it travels over the control channel.
type Blob struct {
	Type BlobType
	Data []byte
	// Encrypted reports the PTM_STATE_FLAG_ENCRYPTED flag: the blob is
	// encrypted with the migration key.
	Encrypted bool
}

// CtrlClient speaks swtpm's control-channel protocol over its unix socket.
// swtpm serves one control connection at a time; CtrlClient dials for
// every command and hangs up afterwards.
type CtrlClient struct {
	// Path is the control socket (swtpm --ctrl type=unixio,path=...).
	Path string
	// Timeout bounds each command when ctx has no earlier deadline
	// (default 10 s).
	Timeout time.Duration
}

// NewCtrlClient returns a client for the control socket at path.
func NewCtrlClient(path string) *CtrlClient { return &CtrlClient{Path: path} }

func (c *CtrlClient) dial(ctx context.Context, cmd Command) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.Path)
	if err != nil {
		return nil, fmt.Errorf("swtpm %v: %w: %v", cmd, ErrCtrl, err)
	}
	to := c.Timeout
	if to == 0 {
		to = 10 * time.Second
	}
	dl := time.Now().Add(to)
	if d, ok := ctx.Deadline(); ok && d.Before(dl) {
		dl = d
	}
	_ = conn.SetDeadline(dl)
	return conn, nil
}

// roundTrip sends cmd with its request body and reads respLen bytes.
func (c *CtrlClient) roundTrip(ctx context.Context, cmd Command, req []byte, respLen int) ([]byte, error) {
	conn, err := c.dial(ctx, cmd)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	msg := binary.BigEndian.AppendUint32(nil, uint32(cmd))
	msg = append(msg, req...)
	if _, err := conn.Write(msg); err != nil {
		return nil, fmt.Errorf("swtpm %v: %w: %v", cmd, ErrCtrl, err)
	}
	rsp := make([]byte, respLen)
	if _, err := io.ReadFull(conn, rsp); err != nil {
		return nil, fmt.Errorf("swtpm %v: %w: reading response: %v", cmd, ErrCtrl, err)
	}
	return rsp, nil
}

// simple runs a command whose response is only a TPM result.
func (c *CtrlClient) simple(ctx context.Context, cmd Command, req []byte) error {
	rsp, err := c.roundTrip(ctx, cmd, req, 4)
	if err != nil {
		return err
	}
	if rc := binary.BigEndian.Uint32(rsp); rc != 0 {
		return &ResultError{Cmd: cmd, Code: rc}
	}
	return nil
}

// GetCapability returns the PTM_CAP_* bit mask of the control commands the
// swtpm supports.
func (c *CtrlClient) GetCapability(ctx context.Context) (uint64, error) {
	rsp, err := c.roundTrip(ctx, CmdGetCapability, nil, 8)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint64(rsp), nil
}

// Init (CMD_INIT) initialises the TPM: it loads the state from disk (or the
// blobs set with SetStateBlob) and, when swtpm runs with --flags
// startup-*, sends TPM2_Startup. flags is 0 or InitFlagDeleteVolatile. A
// state that does not decrypt returns an error matching ErrWrongPassphrase.
func (c *CtrlClient) Init(ctx context.Context, flags uint32) error {
	return c.simple(ctx, CmdInit, binary.BigEndian.AppendUint32(nil, flags))
}

// Shutdown (CMD_SHUTDOWN) stops the TPM and makes swtpm exit.
func (c *CtrlClient) Shutdown(ctx context.Context) error { return c.simple(ctx, CmdShutdown, nil) }

// Stop (CMD_STOP) stops the TPM but keeps swtpm running, so state blobs can
// be written (SetStateBlob); Init starts it again. Blobs can only be read
// while the TPM runs.
func (c *CtrlClient) Stop(ctx context.Context) error { return c.simple(ctx, CmdStop, nil) }

// StoreVolatile (CMD_STORE_VOLATILE) writes the volatile state to disk.
func (c *CtrlClient) StoreVolatile(ctx context.Context) error {
	return c.simple(ctx, CmdStoreVolatile, nil)
}

// GetConfig (CMD_GET_CONFIG) returns the ConfigFileKey / ConfigMigrationKey
// flags.
func (c *CtrlClient) GetConfig(ctx context.Context) (uint32, error) {
	rsp, err := c.roundTrip(ctx, CmdGetConfig, nil, 8)
	if err != nil {
		return 0, err
	}
	if rc := binary.BigEndian.Uint32(rsp); rc != 0 {
		return 0, &ResultError{Cmd: CmdGetConfig, Code: rc}
	}
	return binary.BigEndian.Uint32(rsp[4:]), nil
}

// maxBlob bounds a state blob (swtpm's are tens of KiB).
const maxBlob = 16 << 20

// GetStateBlob (CMD_GET_STATEBLOB) reads one state blob of a running
// (initialised) TPM as swtpm hands it out: encrypted with the migration key
// when swtpm has one. Reading the volatile blob makes swtpm serialise the
// volatile state first. Over the socket
// swtpm returns everything from the requested offset in one response;
// should it return less than the total, GetStateBlob asks again from the
// new offset until it has the whole blob.
func (c *CtrlClient) GetStateBlob(ctx context.Context, t BlobType) (Blob, error) {
	b := Blob{Type: t}
	total := -1
	for total < 0 || len(b.Data) < total {
		req := binary.BigEndian.AppendUint32(nil, 0) // state_flags: never ask for decrypted state
		req = binary.BigEndian.AppendUint32(req, uint32(t))
		req = binary.BigEndian.AppendUint32(req, uint32(len(b.Data)))
		chunk, flags, tot, err := c.getStateChunk(ctx, req)
		if err != nil {
			return Blob{}, err
		}
		if total < 0 {
			total = tot
			b.Encrypted = flags&stateFlagEncrypted != 0
		}
		if len(chunk) == 0 && len(b.Data) < total {
			return Blob{}, fmt.Errorf("swtpm %v: %w: short blob (%d of %d bytes)", CmdGetStateBlob, ErrCtrl, len(b.Data), total)
		}
		b.Data = append(b.Data, chunk...)
	}
	return b, nil
}

func (c *CtrlClient) getStateChunk(ctx context.Context, req []byte) (data []byte, flags uint32, total int, err error) {
	conn, err := c.dial(ctx, CmdGetStateBlob)
	if err != nil {
		return nil, 0, 0, err
	}
	defer conn.Close()
	msg := binary.BigEndian.AppendUint32(nil, uint32(CmdGetStateBlob))
	if _, err := conn.Write(append(msg, req...)); err != nil {
		return nil, 0, 0, fmt.Errorf("swtpm %v: %w: %v", CmdGetStateBlob, ErrCtrl, err)
	}
	var hdr [16]byte
	// On error swtpm may answer with the 4-byte result only.
	if _, err := io.ReadFull(conn, hdr[:4]); err != nil {
		return nil, 0, 0, fmt.Errorf("swtpm %v: %w: %v", CmdGetStateBlob, ErrCtrl, err)
	}
	if rc := binary.BigEndian.Uint32(hdr[:4]); rc != 0 {
		return nil, 0, 0, &ResultError{Cmd: CmdGetStateBlob, Code: rc}
	}
	if _, err := io.ReadFull(conn, hdr[4:]); err != nil {
		return nil, 0, 0, fmt.Errorf("swtpm %v: %w: %v", CmdGetStateBlob, ErrCtrl, err)
	}
	flags = binary.BigEndian.Uint32(hdr[4:8])
	tot := binary.BigEndian.Uint32(hdr[8:12])
	n := binary.BigEndian.Uint32(hdr[12:16])
	if tot > maxBlob || n > tot {
		return nil, 0, 0, fmt.Errorf("swtpm %v: %w: blob length %d of %d", CmdGetStateBlob, ErrCtrl, n, tot)
	}
	data = make([]byte, n)
	if _, err := io.ReadFull(conn, data); err != nil {
		return nil, 0, 0, fmt.Errorf("swtpm %v: %w: %v", CmdGetStateBlob, ErrCtrl, err)
	}
	// tot counts the bytes from the requested offset on.
	off := binary.BigEndian.Uint32(req[8:12])
	return data, flags, int(off + tot), nil
}

// SetStateBlob (CMD_SET_STATEBLOB) hands a state blob to a stopped TPM (not
// yet initialised, or after Stop); the next Init uses it. An encrypted blob
// is decrypted with swtpm's migration key; a wrong key returns an error
// matching ErrWrongPassphrase. The blob is sent as one message; swtpm reads
// it in chunks of its transfer buffer.
func (c *CtrlClient) SetStateBlob(ctx context.Context, b Blob) error {
	if len(b.Data) > maxBlob {
		return fmt.Errorf("swtpm %v: %w: blob of %d bytes", CmdSetStateBlob, ErrBadStateBlob, len(b.Data))
	}
	var flags uint32
	if b.Encrypted {
		flags = stateFlagEncrypted
	}
	req := binary.BigEndian.AppendUint32(nil, flags)
	req = binary.BigEndian.AppendUint32(req, uint32(b.Type))
	req = binary.BigEndian.AppendUint32(req, uint32(len(b.Data)))
	return c.simple(ctx, CmdSetStateBlob, append(req, b.Data...))
}
