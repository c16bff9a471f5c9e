package fake_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/fake"
	"github.com/vtpmm/vtpmm/internal/guestseal"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
)

// sealPCR is the PCR the test guest measures its "boot" into and seals to.
const sealPCR = 16

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// tmpDir is a short directory under /tmp (swtpm paths), removed at the end.
func tmpDir(t *testing.T, prefix string) string {
	t.Helper()
	d, err := os.MkdirTemp("/tmp", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(d) })
	return d
}

func testLog(t *testing.T) logrus.FieldLogger {
	l := logrus.New()
	l.SetOutput(testWriter{t})
	l.SetLevel(logrus.DebugLevel)
	return l
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// newHosts makes a network with the named hosts; every swtpm is stopped
// at the end of the test.
func newHosts(t *testing.T, names ...string) (*fake.Network, []*fake.Host) {
	t.Helper()
	n := fake.NewNetwork()
	var hosts []*fake.Host
	for _, name := range names {
		h, err := n.AddHost(context.Background(), fake.HostConfig{Name: name, Dir: tmpDir(t, "fakehv-"+name+"-"), Log: testLog(t)})
		if err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, h)
	}
	t.Cleanup(func() {
		if err := n.Close(context.Background()); err != nil {
			t.Error(err)
		}
	})
	return n, hosts
}

func randBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func newUUID(t *testing.T) string {
	b := randBytes(t, 16)
	b[6], b[8] = b[6]&0x0f|0x40, b[8]&0x3f|0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

type vm struct {
	uuid  string
	key   []byte // the VM key: the vTPM secret's value
	state string // initial state dir
}

// newVM manufactures an encrypted vTPM (like vtpmd will), defines the VM
// on h with its secret and starts it.
func newVM(t *testing.T, h *fake.Host) vm {
	t.Helper()
	ctx := ctxT(t)
	v := vm{uuid: newUUID(t), key: randBytes(t, 32)}
	v.state = filepath.Join(tmpDir(t, "vm-"), "tpm2")
	if err := swtpm.Setup(ctx, swtpm.SetupConfig{StateDir: v.state, VMID: v.uuid, VMName: "vm-" + v.uuid[:8], Passphrase: v.key}); err != nil {
		t.Fatal(err)
	}
	if err := h.DefineVTPMDomain(ctx, hypervisor.Domain{UUID: v.uuid, Name: "vm-" + v.uuid[:8]}, v.state); err != nil {
		t.Fatal(err)
	}
	if err := h.DefineSecret(ctx, v.uuid, v.key); err != nil {
		t.Fatal(err)
	}
	if err := h.StartDomain(ctx, v.uuid); err != nil {
		t.Fatal(err)
	}
	return v
}

// guest runs f on the VM's running vTPM, as its guest would.
func guest(t *testing.T, h *fake.Host, uuid string, f func(tpm transport.TPM)) {
	t.Helper()
	uri, err := h.VTPMURI(uuid)
	if err != nil {
		t.Fatal(err)
	}
	tpm, err := vtpm.Open(ctxT(t), uri)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	f(tpm)
}

// measureBoot extends the guest's boot measurement into sealPCR.
func measureBoot(t *testing.T, tpm transport.TPM) {
	t.Helper()
	d := sha256.Sum256([]byte("guest boot"))
	if _, err := (tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(sealPCR), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: d[:]}}},
	}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
}

// bootAndSeal measures the guest's boot and seals secret to it.
func bootAndSeal(t *testing.T, h *fake.Host, uuid string, secret []byte) {
	t.Helper()
	guest(t, h, uuid, func(tpm transport.TPM) {
		measureBoot(t, tpm)
		if err := guestseal.Seal(ctxT(t), tpm, secret, []int{sealPCR}); err != nil {
			t.Fatal(err)
		}
	})
}

// checkVTPM checks that the VM runs on h with a working vTPM that still
// unseals secret (so its volatile state, PCR 16, came along too).
func checkVTPM(t *testing.T, h *fake.Host, uuid string, secret []byte) {
	t.Helper()
	ctx := ctxT(t)
	d, err := h.Domain(ctx, uuid)
	if err != nil || d.State != hypervisor.StateRunning {
		t.Fatalf("Domain(%s) on %s = %+v, %v; want running", uuid, h.Name(), d, err)
	}
	guest(t, h, uuid, func(tpm transport.TPM) {
		if r, err := (tpm2.GetRandom{BytesRequested: 16}).Execute(tpm); err != nil || len(r.RandomBytes.Buffer) != 16 {
			t.Fatalf("GetRandom on %s: %v", h.Name(), err)
		}
		got, err := guestseal.Unseal(ctx, tpm)
		if err != nil || !bytes.Equal(got, secret) {
			t.Fatalf("Unseal on %s = %q, %v; want %q", h.Name(), got, err, secret)
		}
	})
}

// checkAbsent checks that h has neither the domain nor any state for it.
func checkAbsent(t *testing.T, h *fake.Host, uuid string) {
	t.Helper()
	d, err := h.Domain(ctxT(t), uuid)
	if err != nil || d.State != hypervisor.StateAbsent {
		t.Errorf("Domain(%s) on %s = %+v, %v; want absent", uuid, h.Name(), d, err)
	}
	if _, err := os.Stat(filepath.Join(h.Dir(), "vms", uuid)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state of %s left on %s: %v", uuid, h.Name(), err)
	}
}
