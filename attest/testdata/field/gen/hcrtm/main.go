// Command hcrtm regenerates attest/testdata/field/eventlogs/hcrtm-swtpm.bin
// and its ground truth hcrtm-swtpm.pcrs.json:
//
//	go run ./attest/testdata/field/gen/hcrtm -out attest/testdata/field/eventlogs
//
// The log is SYNTHETIC (no public H-CRTM log with recorded PCR values was
// found): a Spec ID event, an EV_EFI_HCRTM_EVENT on PCR 0, then every event
// of the real GCE COS-85 log (attest/testdata/realworld/attestations/
// extracted/gce-cos-85.eventlog.bin) in the banks the TPM allocates.
//
// The expected PCR values are NOT computed by a replay: a fresh swtpm (not
// started) receives a real H-CRTM sequence (swtpm_ioctl -h, i.e.
// _TPM_Hash_Start/_TPM_Hash_Data/_TPM_Hash_End before TPM2_Startup), then
// TPM2_Startup(CLEAR), then one PCR_Extend per event, and the values are
// read back with PCR_Read. libtpms decides how PCR 0 starts.
package main

import (
	"crypto"
	_ "crypto/sha1"
	_ "crypto/sha256"
	_ "crypto/sha512"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/attest"
)

// hcrtmData stands for what an H-CRTM (e.g. a boot ACM or a ROM) measures;
// its digest is what the TPM extends into PCR 0 and what the
// EV_EFI_HCRTM_EVENT records. The event data is the string "HCRTM" (TCG PC
// Client PFP 1.05, EV_EFI_HCRTM_EVENT).
const hcrtmData = "vtpmm synthetic H-CRTM measurement (stands for a boot ACM)"

func main() {
	out := flag.String("out", "attest/testdata/field/eventlogs", "output directory")
	base := flag.String("base", "attest/testdata/realworld/attestations/extracted/gce-cos-85.eventlog.bin", "real log whose events follow the H-CRTM event")
	flag.Parse()
	if err := run(*out, *base); err != nil {
		log.Fatal(err)
	}
}

type bank struct {
	name string
	alg  tpm2.TPMIAlgHash
	h    crypto.Hash
}

var allBanks = []bank{
	{"sha1", tpm2.TPMAlgSHA1, crypto.SHA1},
	{"sha256", tpm2.TPMAlgSHA256, crypto.SHA256},
	{"sha384", tpm2.TPMAlgSHA384, crypto.SHA384},
	{"sha512", tpm2.TPMAlgSHA512, crypto.SHA512},
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func run(outDir, basePath string) error {
	baseRaw, err := os.ReadFile(basePath)
	if err != nil {
		return err
	}
	baseLog, err := attest.ParseEventLog(baseRaw)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "hcrtm-swtpm-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	srv, err := freePort()
	if err != nil {
		return err
	}
	ctl, err := freePort()
	if err != nil {
		return err
	}
	// not-need-init: TPM_Init is done, TPM2_Startup is not (no
	// startup-clear), so the H-CRTM sequence runs before Startup.
	cmd := exec.Command("swtpm", "socket", "--tpm2",
		"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", srv),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", ctl),
		"--tpmstate", "dir="+dir, "--flags", "not-need-init")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	var conn net.Conn
	for i := 0; i < 100; i++ {
		if conn, err = net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", srv)); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("connect swtpm: %w", err)
	}
	tpm := transport.FromReadWriteCloser(conn)
	defer tpm.Close()

	ioctl := exec.Command("swtpm_ioctl", "--tcp", fmt.Sprintf("127.0.0.1:%d", ctl), "-h", hcrtmData)
	if b, err := ioctl.CombinedOutput(); err != nil {
		return fmt.Errorf("swtpm_ioctl -h: %v: %s", err, b)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		return fmt.Errorf("startup: %w", err)
	}
	banks, err := allocated(tpm, baseLog)
	if err != nil {
		return err
	}
	var names []string
	for _, b := range banks {
		names = append(names, b.name)
	}
	log.Printf("TPM banks shared with the base log: %s", strings.Join(names, ","))

	var events []agileEvent
	hc := agileEvent{pcr: 0, typ: uint32(attest.EvEFIHCRTMEvent), data: []byte("HCRTM"), digests: map[string][]byte{}}
	for _, b := range banks {
		hh := b.h.New()
		hh.Write([]byte(hcrtmData))
		hc.digests[b.name] = hh.Sum(nil)
	}
	events = append(events, hc)
	for _, ev := range baseLog.Events {
		e := agileEvent{pcr: uint32(ev.PCR), typ: uint32(ev.Type), data: ev.Data, digests: map[string][]byte{}}
		for _, b := range banks {
			d, ok := ev.Digests[attest.Bank(b.name)]
			if !ok {
				return fmt.Errorf("base event %d has no %s digest", ev.Index, b.name)
			}
			e.digests[b.name] = d
		}
		events = append(events, e)
		if ev.Type == attest.EvNoAction {
			continue
		}
		var dv tpm2.TPMLDigestValues
		for _, b := range banks {
			dv.Digests = append(dv.Digests, tpm2.TPMTHA{HashAlg: b.alg, Digest: d(e, b)})
		}
		if _, err := (tpm2.PCRExtend{PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(ev.PCR), Auth: tpm2.PasswordAuth(nil)}, Digests: dv}).Execute(tpm); err != nil {
			return fmt.Errorf("extend PCR %d: %w", ev.PCR, err)
		}
	}
	pcrs := map[string]map[string]string{}
	used := map[int]bool{0: true}
	for _, e := range events {
		if e.typ != uint32(attest.EvNoAction) {
			used[int(e.pcr)] = true
		}
	}
	for _, b := range banks {
		pcrs[b.name] = map[string]string{}
		for i := range 24 {
			if !used[i] {
				continue
			}
			rsp, err := (tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
				{Hash: b.alg, PCRSelect: tpm2.PCClientCompatible.PCRs(uint(i))}}}}).Execute(tpm)
			if err != nil {
				return fmt.Errorf("PCR_Read %s %d: %w", b.name, i, err)
			}
			if len(rsp.PCRValues.Digests) != 1 {
				return fmt.Errorf("PCR_Read %s %d: %d values", b.name, i, len(rsp.PCRValues.Digests))
			}
			pcrs[b.name][fmt.Sprint(i)] = hex.EncodeToString(rsp.PCRValues.Digests[0].Buffer)
		}
	}
	logBytes := encodeLog(banks, events)
	if err := os.WriteFile(filepath.Join(outDir, "hcrtm-swtpm.bin"), logBytes, 0o644); err != nil {
		return err
	}
	ver, _ := exec.Command("swtpm", "--version").CombinedOutput()
	truth := map[string]any{
		"_about": "Ground truth for hcrtm-swtpm.bin: PCR values read with TPM2_PCR_Read from swtpm after a real H-CRTM sequence " +
			"(swtpm_ioctl -h, before TPM2_Startup) and one TPM2_PCR_Extend per event; not a replay. Regenerate with " +
			"go run ./attest/testdata/field/gen/hcrtm",
		"tpm":        strings.TrimSpace(string(ver)),
		"hcrtm_data": hcrtmData,
		"pcrs":       pcrs,
	}
	j, err := json.MarshalIndent(truth, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(outDir, "hcrtm-swtpm.pcrs.json"), append(j, '\n'), 0o644); err != nil {
		return err
	}
	log.Printf("wrote %d events, %d bytes", len(events), len(logBytes))
	return nil
}

func d(e agileEvent, b bank) []byte { return e.digests[b.name] }

// allocated returns the banks both the TPM and the base log have.
func allocated(tpm transport.TPM, l *attest.EventLog) ([]bank, error) {
	rsp, err := (tpm2.GetCapability{Capability: tpm2.TPMCapPCRs, PropertyCount: 1}).Execute(tpm)
	if err != nil {
		return nil, err
	}
	sels, err := rsp.CapabilityData.Data.AssignedPCR()
	if err != nil {
		return nil, err
	}
	var out []bank
	for _, b := range allBanks {
		inLog := false
		for _, lb := range l.Banks {
			inLog = inLog || string(lb) == b.name
		}
		for _, s := range sels.PCRSelections {
			if s.Hash == b.alg && inLog && len(s.PCRSelect) > 0 && s.PCRSelect[0] != 0 {
				out = append(out, b)
			}
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no bank shared by the TPM and the log")
	}
	return out, nil
}

type agileEvent struct {
	pcr, typ uint32
	digests  map[string][]byte
	data     []byte
}

func algID(name string) uint16 {
	for _, b := range allBanks {
		if b.name == name {
			return uint16(b.alg)
		}
	}
	panic(name)
}

// encodeLog writes a crypto-agile TCG log: the Spec ID event in the SHA-1
// event format, then TCG_PCR_EVENT2 events.
func encodeLog(banks []bank, events []agileEvent) []byte {
	le := binary.LittleEndian
	spec := []byte("Spec ID Event03\x00")
	spec = le.AppendUint32(spec, 0) // platform class
	spec = append(spec, 0, 2, 0, 2) // minor 0, major 2, errata 0, uintnSize 2
	spec = le.AppendUint32(spec, uint32(len(banks)))
	for _, b := range banks {
		spec = le.AppendUint16(spec, uint16(b.alg))
		spec = le.AppendUint16(spec, uint16(b.h.Size()))
	}
	spec = append(spec, 0) // vendorInfoSize
	var out []byte
	out = le.AppendUint32(out, 0)
	out = le.AppendUint32(out, uint32(attest.EvNoAction))
	out = append(out, make([]byte, 20)...)
	out = le.AppendUint32(out, uint32(len(spec)))
	out = append(out, spec...)
	for _, e := range events {
		out = le.AppendUint32(out, e.pcr)
		out = le.AppendUint32(out, e.typ)
		out = le.AppendUint32(out, uint32(len(banks)))
		for _, b := range banks {
			out = le.AppendUint16(out, algID(b.name))
			out = append(out, e.digests[b.name]...)
		}
		out = le.AppendUint32(out, uint32(len(e.data)))
		out = append(out, e.data...)
	}
	return out
}
