package vtpm

// RecoveryAuthValue exposes the recovery slot's authValue derivation to tests.
var RecoveryAuthValue = recoveryAuthValue
