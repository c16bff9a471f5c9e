package inproc

import (
	"errors"
	"fmt"
	"net"
	"testing"
)

// TestPortTaken: the error of a member whose port another process took
// between its pick and etcd's bind, as vtpmd's start wraps it, is what New
// retries; other start errors are not.
func TestPortTaken(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, bindErr := net.Listen("tcp", l.Addr().String())
	if bindErr == nil {
		t.Fatal("a second listener on a taken port")
	}
	wrapped := fmt.Errorf("inproc: start vtpmd on host-a: %w", fmt.Errorf("start daemon: %w",
		fmt.Errorf("registry: %w", fmt.Errorf("registry: start etcd member host-a: %w", bindErr))))
	if !portTaken(wrapped) {
		t.Fatalf("not seen as a taken port: %v", wrapped)
	}
	if portTaken(errors.New("registry: start etcd member host-a: data dir damaged")) {
		t.Fatal("another start error seen as a taken port")
	}
}
