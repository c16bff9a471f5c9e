// Package swtpm owns the lifecycle of the swtpm processes behind VM vTPMs:
// manufacturing an encrypted vTPM state the way libvirt 9.0 does
// (swtpm_setup with --pwdfile-fd and aes-256-cbc), running swtpm in socket
// mode with the state key and migration key given as passphrases on
// inherited pipes, talking swtpm's control-channel protocol (CtrlClient:
// CMD_INIT, CMD_STOP, CMD_SHUTDOWN, CMD_GET_STATEBLOB, CMD_SET_STATEBLOB,
// ...), and exporting/importing the migration-key-encrypted state blobs.
//
// Passphrases never go to a file, argv, the environment or a log: they are
// written into a pipe whose read end swtpm inherits (exec.Cmd.ExtraFiles).
// The package logs only through an injected logrus.FieldLogger.
package swtpm
