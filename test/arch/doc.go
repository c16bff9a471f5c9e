// Package arch owns the tests of vtpmm's architecture: the CLI builds
// without cgo and links no libvirt and no TPM simulator, and no package
// imports a package above it (docs/architecture.md). It has no code.
package arch
