package metrics

import "errors"

// ErrServe means the metrics HTTP server could not listen or stopped with
// an error.
var ErrServe = errors.New("metrics server failed")
