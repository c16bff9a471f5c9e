package metrics

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/sirupsen/logrus"
)

// ShutdownTimeout bounds the graceful shutdown of the metrics server.
const ShutdownTimeout = 5 * time.Second

// Serve listens on addr and serves /metrics and /healthz until ctx ends,
// then shuts the server down gracefully. It returns nil after a shutdown
// caused by ctx, and an error wrapping ErrServe if it cannot listen or the
// server fails.
func Serve(ctx context.Context, addr string, m *Metrics, log logrus.FieldLogger) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics: listen %s: %w: %w", addr, ErrServe, err)
	}
	return ServeListener(ctx, ln, m, log)
}

// ServeListener is Serve on an existing listener, which it closes.
func ServeListener(ctx context.Context, ln net.Listener, m *Metrics, log logrus.FieldLogger) error {
	if log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		log = l
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.Handler())
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = io.WriteString(w, "ok\n")
	})
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
	}
	addr := ln.Addr().String()
	log.WithField("addr", addr).Info("metrics server listening")
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("metrics: serve %s: %w: %w", addr, ErrServe, err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ShutdownTimeout)
	defer cancel()
	err := srv.Shutdown(sctx)
	if serr := <-errc; !errors.Is(serr, http.ErrServerClosed) && serr != nil {
		err = errors.Join(err, serr)
	}
	if err != nil {
		_ = srv.Close()
		return fmt.Errorf("metrics: shutdown %s: %w: %w", addr, ErrServe, err)
	}
	log.WithField("addr", addr).Info("metrics server stopped")
	return nil
}
