package main

import (
	"context"
	"fmt"
	"io"

	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/vtpm/host"
)

// Deps are what the composition root (main) wires in.
type Deps struct {
	// Hypervisors opens the configured hypervisor URI (main registers
	// hypervisor/libvirt; tests may leave it empty).
	Hypervisors *hypervisor.Registry
}

// env carries what every command needs; nothing is global.
type env struct {
	deps           Deps
	stdin          io.Reader
	stdout, stderr io.Writer
	log            *logrus.Logger

	configPath string
	overrides  daemon.Config // non-empty fields override the file
	logLevel   string
}

// config loads the configuration file and applies flag overrides.
func (e *env) config() (daemon.Config, error) {
	c, err := daemon.LoadConfig(e.configPath)
	if err != nil && e.configPath != "" {
		return daemon.Config{}, err
	}
	o := e.overrides
	for _, f := range []struct {
		dst *string
		v   string
	}{
		{&c.HostID, o.HostID}, {&c.DataDir, o.DataDir}, {&c.TPM, o.TPM}, {&c.TPMProfile, o.TPMProfile},
		{&c.RunDir, o.RunDir}, {&c.Vault.PCRs, o.Vault.PCRs},
	} {
		if f.v != "" {
			*f.dst = f.v
		}
	}
	if e.logLevel != "" {
		c.LogLevel = e.logLevel
	}
	lvl, err := logrus.ParseLevel(c.LogLevel)
	if err != nil {
		return daemon.Config{}, fmt.Errorf("%w: log_level: %v", daemon.ErrConfig, err)
	}
	e.log.SetLevel(lvl)
	return c, c.Validate()
}

func (e *env) opts() host.Options { return host.Options{Log: e.log} }

// withHost loads the configuration, opens the host (unsealing the vault
// once) and closes it after f.
func (e *env) withHost(ctx context.Context, f func(cfg daemon.Config, h *host.Host) error) error {
	cfg, err := e.config()
	if err != nil {
		return err
	}
	h, err := host.Open(ctx, cfg.Config, e.opts())
	if err != nil {
		return err
	}
	defer h.Close(ctx)
	return f(cfg, h)
}

// Run runs vtpmd with args (without the program name).
func Run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer, deps Deps) error {
	e := &env{deps: deps, stdin: stdin, stdout: stdout, stderr: stderr, log: logrus.New()}
	e.log.SetOutput(stderr)
	e.log.SetFormatter(&logrus.JSONFormatter{})
	root := &cobra.Command{
		Use:           "vtpmd",
		Short:         "vtpmm host agent: binds VM vTPM keys to this host's TPM",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	pf := root.PersistentFlags()
	pf.StringVarP(&e.configPath, "config", "c", "", "YAML configuration file (default: built-in defaults)")
	pf.StringVar(&e.overrides.HostID, "host-id", "", "override host_id")
	pf.StringVar(&e.overrides.DataDir, "data-dir", "", "override data_dir")
	pf.StringVar(&e.overrides.TPM, "tpm", "", "override tpm (device:///dev/tpmrm0, swtpm+tcp://H:P, swtpm+unix:///path)")
	pf.StringVar(&e.overrides.TPMProfile, "tpm-profile", "", "override tpm_profile (none, ftpm, dtpm)")
	pf.StringVar(&e.overrides.RunDir, "run-dir", "", "override run_dir")
	pf.StringVar(&e.overrides.Vault.PCRs, "pcrs", "", "override vault.pcrs (e.g. 0,2,4,7)")
	pf.StringVar(&e.logLevel, "log-level", "", "override log_level")
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(initCmd(e), runCmd(e), vaultCmd(e), vmCmd(e), evidenceCmd(e))
	err := root.ExecuteContext(ctx)
	if err != nil {
		fmt.Fprintf(stderr, "vtpmd: %v\n", err)
	}
	return err
}
