package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"
)

// env carries what every command needs; nothing is global.
type env struct {
	stdout, stderr io.Writer
	log            *logrus.Logger
	logLevel       string
}

// exitError carries a specific exit code through cobra.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func exitCode(err error) int {
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	return 1
}

// Run runs vtpmctl with args (without the program name).
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	e := &env{stdout: stdout, stderr: stderr, log: logrus.New()}
	e.log.SetOutput(stderr)
	e.log.SetFormatter(&logrus.JSONFormatter{})
	root := &cobra.Command{
		Use:           "vtpmctl",
		Short:         "Operate vtpmm: verify hosts, inspect vTPMs, drive migrations",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(*cobra.Command, []string) error {
			lvl, err := logrus.ParseLevel(e.logLevel)
			if err != nil {
				return fmt.Errorf("--log-level: %w", err)
			}
			e.log.SetLevel(lvl)
			return nil
		},
	}
	root.PersistentFlags().StringVar(&e.logLevel, "log-level", "warning", "log level (JSON logs go to stderr)")
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(attestCommands(e)...)
	root.AddCommand(pkiCommands(e)...)
	auditCmds := auditCommands(e)
	withLocalAudit(auditCmds[0])
	root.AddCommand(auditCmds...)
	root.AddCommand(agentCommands(e)...)
	root.AddCommand(hookCommands(e))
	err := root.ExecuteContext(ctx)
	if err != nil {
		fmt.Fprintf(stderr, "vtpmctl: %v\n", err)
	}
	return err
}
