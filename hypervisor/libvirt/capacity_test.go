package libvirt

import (
	"context"
	"testing"

	golibvirt "libvirt.org/go/libvirt"

	"github.com/vtpmm/vtpmm/hypervisor"
)

// TestCapacityOnTestDriver asks libvirt's built-in test driver
// (test:///default: one host with 16 GiB, domain "test" of 8 GiB, running)
// what an evacuation's placement asks a real libvirtd: a destination's free
// memory (virNodeGetFreeMemory, over a connection to its target URI), a
// domain's memory (virDomainGetInfo) and a running migration's bytes
// (virDomainGetJobStats, which the test driver does not support: no
// progress to tell, inactive).
func TestCapacityOnTestDriver(t *testing.T) {
	ctx := context.Background()
	h, err := New(ctx, Config{URI: "test:///default", Name: "test"})
	if err != nil {
		t.Skipf("libvirt's test driver: %v", err)
	}
	defer h.Close()
	free, err := h.FreeMemory(ctx, hypervisor.Target{Name: "peer", URI: "test:///default"})
	if err != nil || free == 0 {
		t.Fatalf("free memory: %d, %v", free, err)
	}
	doms, err := h.Domains(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var id string
	err = h.with(ctx, func(c *golibvirt.Connect) error {
		d, err := c.LookupDomainByName("test")
		if err != nil {
			return err
		}
		defer d.Free()
		id, err = d.GetUUIDString()
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	mem, err := h.DomainMemory(ctx, id)
	if err != nil || mem < 1<<20 {
		t.Fatalf("memory of the test domain: %d, %v", mem, err)
	}
	done, total, active, err := h.MigrationBytes(ctx, id)
	if err != nil || active || done != 0 || total != 0 {
		t.Fatalf("migration bytes without a job: %d/%d active=%v %v", done, total, active, err)
	}
	if _, err := h.FreeMemory(ctx, hypervisor.Target{Name: "gone"}); err == nil {
		t.Error("free memory of a target without a URI: no error")
	}
	t.Logf("test driver: %d bytes free, domain %s of %d bytes (%d vTPM domains)", free, id, mem, len(doms))
}
