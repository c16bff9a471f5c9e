// Package emuhost owns emulated "hardware" TPMs for tests and demos.
//
// One call (Start) manufactures an swtpm the way a TPM vendor would: RSA-2048
// and ECC P-384 endorsement keys with certificates in NV (0x01c00002,
// 0x01c00016) signed by a local CA that is private to this host, plus a
// platform certificate. It then runs that swtpm in socket mode and hands
// back a Host whose URI opens with vtpm.Open. Host.Boot replays a TCG event
// log into the PCRs the way firmware would, so quotes and event-log policy can
// be tested against a realistic boot state.
//
// Everything a host owns lives under its Config.Dir: the swtpm_setup and
// swtpm-localca configuration, the CA, the TPM state and the logs. Nothing
// touches /etc or /var/lib/swtpm-localca. The package never logs on its own;
// it logs through the injected logrus.FieldLogger.
package emuhost
