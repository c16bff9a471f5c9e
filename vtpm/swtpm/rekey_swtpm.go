package swtpm

import (
	"github.com/vtpmm/vtpmm/internal/atomicfile"

	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/sirupsen/logrus"
)

const permallFile = "tpm2-00.permall"

// exportForRekey copies D's state files (encrypted) to D.rekey-src, loads
// the copy with the old key and reads the blobs under the new migration
// key, then removes the copy.
func exportForRekey(ctx context.Context, d string, oldPass, newPass []byte, log logrus.FieldLogger) (State, error) {
	src := d + rekeySrc
	if err := os.RemoveAll(src); err != nil {
		return State{}, err
	}
	if err := os.Mkdir(src, 0o700); err != nil {
		return State{}, err
	}
	defer os.RemoveAll(src)
	files, err := filepath.Glob(filepath.Join(d, "tpm2-*"))
	if err != nil {
		return State{}, err
	}
	vol := false
	for _, f := range files {
		if err := copyFile(f, filepath.Join(src, filepath.Base(f))); err != nil {
			return State{}, err
		}
		vol = vol || strings.HasSuffix(f, ".volatilestate")
	}
	var st State
	err = runSwtpm(ctx, src, oldPass, newPass, log, func(p *Process) error {
		if err := p.ctrl.Init(ctx, 0); err != nil {
			return err
		}
		var err error
		if st.Permanent, err = migrationBlob(ctx, p.ctrl, BlobPermanent); err != nil {
			return err
		}
		if vol {
			st.Volatile, err = migrationBlob(ctx, p.ctrl, BlobVolatile)
		}
		return err
	})
	if err != nil {
		return State{}, fmt.Errorf("export: %w", err)
	}
	// The blobs' inner layer is not under the state key (that is the point),
	// so SetStateBlob must not be told it is (State.Encrypted false); the
	// migration-key layer is checked by migrationBlob.
	return st, nil
}

// migrationBlob reads a state blob without the state-key layer
// (PTM_STATE_FLAG_DECRYPTED, as QEMU asks for it), which swtpm then wraps
// in the migration key only: the state key can change on import. It
// refuses a blob without the migration-key layer, so plaintext state never
// leaves swtpm.
func migrationBlob(ctx context.Context, c *CtrlClient, t BlobType) ([]byte, error) {
	var data []byte
	total := -1
	for total < 0 || len(data) < total {
		req := binary.BigEndian.AppendUint32(nil, stateFlagDecrypted)
		req = binary.BigEndian.AppendUint32(req, uint32(t))
		req = binary.BigEndian.AppendUint32(req, uint32(len(data)))
		chunk, _, tot, err := c.getStateChunk(ctx, req)
		if err != nil {
			return nil, err
		}
		if total < 0 {
			total = tot
		}
		if len(chunk) == 0 && len(data) < total {
			return nil, fmt.Errorf("swtpm %v: %w: short blob (%d of %d bytes)", CmdGetStateBlob, ErrCtrl, len(data), total)
		}
		data = append(data, chunk...)
	}
	h, err := ParseHeader(data)
	if err != nil {
		return nil, err
	}
	if h.Flags&BlobFlagMigrationEncrypted == 0 {
		wipeBytes(data)
		return nil, fmt.Errorf("%w: swtpm handed out blob type %d without migration-key encryption", ErrNotEncrypted, t)
	}
	return data, nil
}

func wipeBytes(b []byte) {
	for i := range b {
		b[i] = 0
	}
}

// runSwtpm starts swtpm on dir with separate state and migration keys, runs
// f, and shuts swtpm down. A state that does not decrypt yields
// ErrWrongPassphrase.
func runSwtpm(ctx context.Context, dir string, key, migKey []byte, log logrus.FieldLogger, f func(*Process) error) error {
	p, err := startKeys(ctx, dir, key, migKey, log)
	if err != nil {
		return err
	}
	ferr := f(p)
	if ferr != nil && !errors.Is(ferr, ErrWrongPassphrase) && wrongKeyLog(LogTail(p.cfg.LogFile)) {
		ferr = fmt.Errorf("%w: %v", ErrWrongPassphrase, ferr)
	}
	serr := p.Stop(ctx)
	if ferr != nil {
		return ferr
	}
	<-p.Exited()
	return serr
}

// startKeys is Start with a state key and a migration key that differ
// (Start gives swtpm the same passphrase for both, as libvirt does). The
// sockets and swtpm's log live in a private directory under /tmp that Stop
// removes.
func startKeys(ctx context.Context, dir string, key, migKey []byte, log logrus.FieldLogger) (*Process, error) {
	sockDir, err := os.MkdirTemp("/tmp", "vtpm-rekey-")
	if err != nil {
		return nil, err
	}
	cfg := ProcessConfig{StateDir: dir, Passphrase: key, SocketDir: sockDir, LogFile: filepath.Join(sockDir, "swtpm.log"), Log: log}
	p := &Process{cfg: cfg, log: logger(log).WithField("vtpm", filepath.Base(dir)), sockDir: sockDir, ownSock: true}
	ctrlSock := filepath.Join(p.sockDir, "swtpm-ctrl.sock")
	p.dataSock = filepath.Join(p.sockDir, "swtpm.sock")
	p.ctrl = NewCtrlClient(ctrlSock)
	keyPipe, err := secretPipe(key)
	if err != nil {
		p.cleanup()
		return nil, err
	}
	defer keyPipe.Close()
	migPipe, err := secretPipe(migKey)
	if err != nil {
		p.cleanup()
		return nil, err
	}
	defer migPipe.Close()
	p.output = &syncBuffer{}
	p.cmd = exec.Command("swtpm", ProcessArgs(dir, p.dataSock, ctrlSock, cfg.LogFile, 3, 4)...)
	p.cmd.ExtraFiles = []*os.File{keyPipe, migPipe}
	p.cmd.Stdout, p.cmd.Stderr = p.output, p.output
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		p.cleanup()
		return nil, fmt.Errorf("%w: %v", ErrStart, err)
	}
	p.done = make(chan struct{})
	go func() { p.waitErr = p.cmd.Wait(); close(p.done) }()
	if err := p.waitCtrl(ctx); err != nil {
		_ = p.cmd.Process.Kill()
		<-p.done
		p.cleanup()
		return nil, fmt.Errorf("%w: %v (%s)", ErrStart, err, p.diagnostics())
	}
	return p, nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// syncTree fsyncs every regular file in dir, then dir.
func syncTree(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			return err
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return err
		}
	}
	return atomicfile.SyncDir(dir)
}

func renameSync(from, to string) error {
	if err := os.Rename(from, to); err != nil {
		return err
	}
	return atomicfile.SyncDir(filepath.Dir(to))
}
