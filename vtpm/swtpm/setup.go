package swtpm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/vtpm"
)

// SetupConfig describes one VM vTPM to manufacture.
type SetupConfig struct {
	// StateDir receives the TPM state (tpm2-00.permall); created if missing.
	StateDir string
	// VMID is the VM's UUID (canonical form).
	VMID string
	// VMName is the domain name; libvirt passes --vmid NAME:UUID.
	VMName string
	// Passphrase encrypts the state (aes-256-cbc, key derived by swtpm). It
	// is passed unchanged to swtpm_setup on an inherited pipe; these are the
	// same bytes libvirt later passes from the vTPM secret (pwdfd).
	Passphrase []byte
	// CADir holds the private swtpm_setup.conf, swtpm-localca config and the
	// local CA. Default: "swtpm-localca" next to StateDir. Several VMs of a
	// host may share it.
	CADir string
	// PCRBanks to activate (default: swtpm_setup's default, sha256).
	PCRBanks []string
	// LogFile for swtpm_setup (default: StateDir + "-swtpm_setup.log").
	LogFile string
	// Log receives progress messages; nil means no logging.
	Log logrus.FieldLogger
}

// Setup manufactures an encrypted vTPM state the way libvirt 9.0 does for
// <tpm model='tpm-crb'><backend type='emulator' version='2.0'><encryption
// secret='...'/></backend></tpm>: EKs, EK and platform certificates from a
// local CA, NVRAM locked, state encrypted with aes-256-cbc under a key
// derived from Passphrase. An existing state is left alone
// (--not-overwrite), so Setup is idempotent.
func Setup(ctx context.Context, cfg SetupConfig) error {
	if err := available(); err != nil {
		return err
	}
	if cfg.StateDir == "" || len(cfg.Passphrase) == 0 {
		return fmt.Errorf("swtpm setup: %w: StateDir and Passphrase are required", ErrBadConfig)
	}
	if vtpm.CheckVMID(cfg.VMID) != nil {
		return fmt.Errorf("swtpm setup: %w: VMID %q is not a canonical UUID", ErrBadConfig, cfg.VMID)
	}
	stateDir, err := filepath.Abs(cfg.StateDir)
	if err != nil {
		return fmt.Errorf("swtpm setup: %w: %v", ErrBadConfig, err)
	}
	caDir := cfg.CADir
	if caDir == "" {
		caDir = filepath.Join(filepath.Dir(stateDir), "swtpm-localca")
	}
	if caDir, err = filepath.Abs(caDir); err != nil {
		return fmt.Errorf("swtpm setup: %w: %v", ErrBadConfig, err)
	}
	logFile := cfg.LogFile
	if logFile == "" {
		logFile = stateDir + "-swtpm_setup.log"
	}
	if err := checkOptPath(stateDir, caDir, logFile); err != nil {
		return fmt.Errorf("swtpm setup: %w", err)
	}
	for _, d := range []string{stateDir, filepath.Join(caDir, "ca"), filepath.Join(caDir, "tmp")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("swtpm setup: %w", err)
		}
	}
	setupConf, err := writeLocalCAConfig(caDir, cfg.PCRBanks)
	if err != nil {
		return err
	}
	vmid := cfg.VMID
	if cfg.VMName != "" {
		vmid = cfg.VMName + ":" + cfg.VMID
	}
	pw, err := secretPipe(cfg.Passphrase)
	if err != nil {
		return fmt.Errorf("swtpm setup: %w", err)
	}
	defer pw.Close()
	args := SetupArgs(stateDir, setupConf, vmid, logFile, 3, cfg.PCRBanks)
	cmd := exec.CommandContext(ctx, "swtpm_setup", args...)
	cmd.ExtraFiles = []*os.File{pw} // fd 3
	cmd.Env = append(os.Environ(), "TMPDIR="+filepath.Join(caDir, "tmp"))
	log := logger(cfg.Log).WithField("vmid", cfg.VMID)
	log.WithField("cmd", "swtpm_setup "+strings.Join(args, " ")).Debug("manufacturing vTPM")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("swtpm setup %s: %w: %v: %s (log: %s)", cfg.VMID, ErrSetup, err, strings.TrimSpace(string(out)), LogTail(logFile))
	}
	log.Info("vTPM state ready")
	return nil
}

// SetupArgs is the swtpm_setup command line Setup runs (libvirt 9.0's, with
// a private --config). pwdFD is the passphrase pipe's fd number in the child.
func SetupArgs(stateDir, setupConf, vmid, logFile string, pwdFD int, banks []string) []string {
	args := []string{"--tpm2", "--tpmstate", stateDir, "--config", setupConf,
		"--vmid", vmid, "--logfile", logFile,
		"--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite",
		"--pwdfile-fd", fmt.Sprint(pwdFD), "--cipher", "aes-256-cbc"}
	if len(banks) > 0 {
		args = append(args, "--pcr-banks", strings.Join(banks, ","))
	}
	return args
}

// writeLocalCAConfig writes swtpm_setup.conf, swtpm-localca.conf and
// swtpm-localca.options into caDir (never /etc or /var/lib/swtpm-localca)
// and returns the swtpm_setup.conf path.
func writeLocalCAConfig(caDir string, banks []string) (string, error) {
	ca := filepath.Join(caDir, "ca")
	localcaConf := filepath.Join(caDir, "swtpm-localca.conf")
	localcaOpts := filepath.Join(caDir, "swtpm-localca.options")
	setupConf := filepath.Join(caDir, "swtpm_setup.conf")
	active := "sha256"
	if len(banks) > 0 {
		active = strings.Join(banks, ",")
	}
	files := map[string]string{
		localcaConf: fmt.Sprintf("statedir = %[1]s\nsigningkey = %[1]s/signkey.pem\nissuercert = %[1]s/issuercert.pem\ncertserial = %[1]s/certserial\n", ca),
		localcaOpts: "--platform-manufacturer vtpmm\n--platform-version 2.1\n--platform-model QEMU\n",
		setupConf: fmt.Sprintf("create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = %s\n",
			localcaConf, localcaOpts, active),
	}
	for p, c := range files {
		if err := os.WriteFile(p, []byte(c), 0o600); err != nil {
			return "", fmt.Errorf("swtpm setup: %w", err)
		}
	}
	return setupConf, nil
}

// secretPipe returns the read end of a pipe that holds secret and then EOF.
// The caller passes it in exec.Cmd.ExtraFiles and closes it after Start.
func secretPipe(secret []byte) (*os.File, error) {
	if len(secret) > 4096 {
		return nil, fmt.Errorf("%w: passphrase longer than 4096 bytes", ErrBadConfig)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	// A pipe buffers at least 4 KiB, so this write does not block.
	_, err = w.Write(secret)
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

func available() error {
	for _, b := range []string{"swtpm", "swtpm_setup", "swtpm_localca"} {
		if _, err := exec.LookPath(b); err != nil {
			return fmt.Errorf("swtpm: %w: %s not found", ErrNotInstalled, b)
		}
	}
	return nil
}

// checkOptPath refuses paths that swtpm's key=value,key=value option syntax
// cannot carry.
func checkOptPath(paths ...string) error {
	for _, p := range paths {
		if strings.ContainsAny(p, ",=") {
			return fmt.Errorf("%w: path %q contains ',' or '=', which swtpm cannot parse", ErrBadConfig, p)
		}
	}
	return nil
}

// LogTail returns the last 600 bytes of a log file, for error messages.
func LogTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(none)"
	}
	if len(b) > 600 {
		b = b[len(b)-600:]
	}
	return strings.TrimSpace(string(b))
}
