package packaging

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
)

// unitFile is a parsed systemd unit: section -> directive -> values, in
// order (directives may repeat).
type unitFile map[string]map[string][]string

// parseUnit reads systemd's ini-like syntax: [Section] headers, Key=Value
// lines, '#' and ';' comments, and '\' line continuations.
func parseUnit(text string) (unitFile, error) {
	u := unitFile{}
	var sec string
	sc := bufio.NewScanner(strings.NewReader(text))
	n, cont := 0, ""
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if cont != "" {
			line, cont = cont+" "+line, ""
		}
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		if strings.HasSuffix(line, `\`) {
			cont = strings.TrimSuffix(line, `\`)
			continue
		}
		if line[0] == '[' {
			if !strings.HasSuffix(line, "]") {
				return nil, fmt.Errorf("line %d: bad section header %q", n, line)
			}
			sec = line[1 : len(line)-1]
			if _, dup := u[sec]; dup {
				return nil, fmt.Errorf("line %d: section [%s] twice", n, sec)
			}
			u[sec] = map[string][]string{}
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || sec == "" || strings.TrimSpace(k) == "" || strings.ContainsAny(strings.TrimSpace(k), " \t") {
			return nil, fmt.Errorf("line %d: want Key=Value inside a section: %q", n, line)
		}
		k = strings.TrimSpace(k)
		u[sec][k] = append(u[sec][k], strings.TrimSpace(v))
	}
	if cont != "" {
		return nil, fmt.Errorf("line %d: continuation at end of file", n)
	}
	return u, sc.Err()
}

func (u unitFile) one(t *testing.T, sec, key string) string {
	t.Helper()
	v := u[sec][key]
	if len(v) != 1 {
		t.Errorf("[%s] %s: %d values %q, want exactly one", sec, key, len(v), v)
		return ""
	}
	return v[0]
}

// words is every space-separated word of every value of a directive.
func (u unitFile) words(sec, key string) []string {
	var w []string
	for _, v := range u[sec][key] {
		w = append(w, strings.Fields(v)...)
	}
	return w
}

// knownDirectives are the systemd directives (systemd.unit(5),
// systemd.service(5), systemd.exec(5), systemd.kill(5),
// systemd.resource-control(5)) this unit may use: a typo is an error here,
// since systemd-analyze verify is not available on the build machines.
var knownDirectives = map[string][]string{
	"Unit": {"Description", "Documentation", "After", "Before", "Wants", "Requires", "BindsTo", "PartOf",
		"Conflicts", "ConditionPathExists", "AssertPathExists", "StartLimitIntervalSec", "StartLimitBurst"},
	"Service": {"Type", "ExecStart", "ExecStartPre", "ExecReload", "ExecStop", "KillSignal", "KillMode",
		"TimeoutStartSec", "TimeoutStopSec", "Restart", "RestartSec", "RuntimeDirectory", "RuntimeDirectoryMode",
		"StateDirectory", "StateDirectoryMode", "ConfigurationDirectory", "ConfigurationDirectoryMode",
		"LogsDirectory", "UMask", "Environment", "EnvironmentFile", "User", "Group", "SupplementaryGroups",
		"NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "ReadWritePaths", "ReadOnlyPaths",
		"InaccessiblePaths", "DevicePolicy", "DeviceAllow", "ProtectKernelModules", "ProtectKernelTunables",
		"ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname", "RestrictAddressFamilies",
		"RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality", "SystemCallArchitectures",
		"SystemCallFilter", "SystemCallErrorNumber", "CapabilityBoundingSet", "AmbientCapabilities",
		"LimitNOFILE", "MemoryMax", "TasksMax"},
	"Install": {"WantedBy", "RequiredBy", "Alias", "Also"},
}

// Where StateDirectory= and RuntimeDirectory= put their directories for a
// system service.
const (
	stateRoot   = "/var/lib"
	runtimeRoot = "/run"
	configRoot  = "/etc"
)

func loadUnit(t *testing.T) unitFile {
	t.Helper()
	u, err := parseUnit(Unit())
	if err != nil {
		t.Fatalf("vtpmd.service: %v", err)
	}
	return u
}

func TestUnit(t *testing.T) {
	t.Parallel()
	u := loadUnit(t)
	var secs []string
	for s, keys := range u {
		secs = append(secs, s)
		for k := range keys {
			if !slices.Contains(knownDirectives[s], k) {
				t.Errorf("[%s] %s: not a directive this unit is expected to use (typo?)", s, k)
			}
		}
	}
	slices.Sort(secs)
	if !slices.Equal(secs, []string{"Install", "Service", "Unit"}) {
		t.Errorf("sections %v, want Unit, Service, Install", secs)
	}

	if !slices.Contains(u.words("Unit", "After"), "libvirtd.service") {
		t.Errorf("After= %q lacks libvirtd.service", u["Unit"]["After"])
	}
	if !slices.Contains(u.words("Unit", "Before"), "libvirt-guests.service") {
		t.Errorf("Before= %q lacks libvirt-guests.service (VMs started at boot need vtpmd)", u["Unit"]["Before"])
	}
	for key, want := range map[string]string{
		"Type":             "simple", // vtpmd does not call sd_notify
		"ExecStart":        "/usr/local/bin/vtpmd --config /etc/vtpmm/vtpmd.yaml run",
		"Restart":          "on-failure",
		"KillSignal":       "SIGTERM",
		"RuntimeDirectory": "vtpmm",
		"StateDirectory":   "vtpmm",
		"NoNewPrivileges":  "yes",
		"ProtectHome":      "yes",
		"PrivateTmp":       "yes",
		"ProtectSystem":    "strict",
		"DevicePolicy":     "closed",
	} {
		if got := u.one(t, "Service", key); got != want {
			t.Errorf("[Service] %s=%s, want %s", key, got, want)
		}
	}
	if got := u.one(t, "Install", "WantedBy"); got != "multi-user.target" {
		t.Errorf("WantedBy=%s", got)
	}
	// The host TPM must stay reachable: DeviceAllow the resource manager,
	// and no PrivateDevices (it would hide /dev/tpmrm0).
	if !slices.Contains(u["Service"]["DeviceAllow"], "/dev/tpmrm0 rw") {
		t.Errorf("DeviceAllow=%q lacks \"/dev/tpmrm0 rw\"", u["Service"]["DeviceAllow"])
	}
	if _, ok := u["Service"]["PrivateDevices"]; ok {
		t.Error("PrivateDevices= hides /dev/tpmrm0")
	}
	// libvirt is reached over a unix socket.
	if af := u.words("Service", "RestrictAddressFamilies"); len(af) > 0 && !slices.Contains(af, "AF_UNIX") {
		t.Errorf("RestrictAddressFamilies=%v blocks the libvirt and admin sockets", af)
	}
	rw := u.words("Service", "ReadWritePaths")
	for _, p := range []string{"/var/lib/vtpmm", "/run/vtpmm"} {
		if !slices.Contains(rw, p) {
			t.Errorf("ReadWritePaths=%v lacks %s", rw, p)
		}
	}
}

// TestUnitMatchesSampleConfig: every path the sample configuration writes
// is writable under ProtectSystem=strict, and the directories systemd
// creates are the ones the configuration uses.
func TestUnitMatchesSampleConfig(t *testing.T) {
	t.Parallel()
	u := loadUnit(t)
	cfg, err := daemon.LoadConfig("vtpmd.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if d := filepath.Join(stateRoot, u.one(t, "Service", "StateDirectory")); d != cfg.DataDir {
		t.Errorf("StateDirectory makes %s, data_dir is %s", d, cfg.DataDir)
	}
	if d := filepath.Join(runtimeRoot, u.one(t, "Service", "RuntimeDirectory")); d != cfg.RunDir {
		t.Errorf("RuntimeDirectory makes %s, run_dir is %s", d, cfg.RunDir)
	}
	exec := strings.Fields(u.one(t, "Service", "ExecStart"))
	if i := slices.Index(exec, "--config"); i < 0 || i+1 >= len(exec) ||
		filepath.Dir(exec[i+1]) != filepath.Join(configRoot, u.one(t, "Service", "ConfigurationDirectory")) {
		t.Errorf("ExecStart %v: --config is not in ConfigurationDirectory", exec)
	}
	under := func(p string) bool {
		for _, w := range u.words("Service", "ReadWritePaths") {
			w = strings.TrimLeft(w, "-")
			if p == w || strings.HasPrefix(p, w+"/") {
				return true
			}
		}
		return false
	}
	for name, p := range map[string]string{
		"data_dir": cfg.DataDir, "run_dir": cfg.RunDir, "admin_socket": cfg.AdminSocketPath(),
		"audit_log": cfg.AuditLog, "attestation.enrollments": cfg.Attestation.Enrollments,
	} {
		if !under(p) {
			t.Errorf("%s %s is not under ReadWritePaths: vtpmd cannot write it under ProtectSystem=strict", name, p)
		}
	}
}

func TestSampleConfig(t *testing.T) {
	t.Parallel()
	cfg, err := daemon.LoadConfig("vtpmd.yaml")
	if err != nil {
		t.Fatalf("LoadConfig(vtpmd.yaml): %v", err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	// Every field of daemon.Config is set in the sample (commented, not
	// left out), so the sample documents all of them.
	var doc map[string]any
	if err := yaml.Unmarshal([]byte(SampleConfig()), &doc); err != nil {
		t.Fatal(err)
	}
	for _, key := range yamlKeys(reflect.TypeFor[daemon.Config](), "") {
		v, ok := lookup(doc, key)
		if !ok || v == nil || v == "" {
			t.Errorf("the sample does not set %s", key)
		}
	}
	// Top-level keys come with a comment.
	lines := strings.Split(SampleConfig(), "\n")
	for i, l := range lines {
		if l == "" || l[0] == ' ' || l[0] == '#' || !strings.Contains(l, ":") {
			continue
		}
		if i == 0 || !strings.HasPrefix(lines[i-1], "#") {
			t.Errorf("line %d %q has no comment above it", i+1, l)
		}
	}
	// Where the sample shows the default, it is the real default.
	def := daemon.DefaultConfig()
	for _, c := range []struct{ name, got, want string }{
		{"data_dir", cfg.DataDir, def.DataDir},
		{"tpm", cfg.TPM, def.TPM},
		{"tpm_profile", cfg.TPMProfile, def.TPMProfile},
		{"vault.pcrs", cfg.Vault.PCRs, def.Vault.PCRs},
		{"vault.srk_handle", cfg.Vault.SRKHandle, def.Vault.SRKHandle},
		{"run_dir", cfg.RunDir, def.RunDir},
		{"log_level", cfg.LogLevel, def.LogLevel},
		{"event_log", cfg.EventLog, def.EventLog},
		{"attestation.evidence_max_age", cfg.Attestation.EvidenceMaxAge, def.Attestation.EvidenceMaxAge},
		{"admin_socket", cfg.AdminSocket, def.AdminSocketPath()},
		{"audit_log", cfg.AuditLog, filepath.Join(def.DataDir, "audit.log")},
	} {
		if c.got != c.want {
			t.Errorf("%s: the sample shows %q as the default, the default is %q", c.name, c.got, c.want)
		}
		if !strings.Contains(SampleConfig(), "Default: "+c.want) && !strings.Contains(SampleConfig(), "Default: \""+c.want+"\"") &&
			c.name != "admin_socket" && c.name != "audit_log" {
			t.Errorf("%s: the comment does not say \"Default: %s\"", c.name, c.want)
		}
	}
	if len(cfg.Peers) == 0 || len(cfg.Attestation.Roots) == 0 {
		t.Errorf("the sample shows no peers or roots: %+v", cfg)
	}
}

// yamlKeys lists the dotted yaml keys of the leaves of a config struct.
func yamlKeys(t reflect.Type, prefix string) []string {
	var out []string
	for f := range t.Fields() {
		tag, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if opts == "inline" {
			out = append(out, yamlKeys(f.Type, prefix)...)
			continue
		}
		if tag == "" || tag == "-" {
			continue
		}
		if f.Type.Kind() == reflect.Struct {
			out = append(out, yamlKeys(f.Type, prefix+tag+".")...)
			continue
		}
		out = append(out, prefix+tag)
	}
	return out
}

func lookup(doc map[string]any, dotted string) (any, bool) {
	var cur any = doc
	for _, k := range strings.Split(dotted, ".") {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = m[k]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// The tests below build the real binaries: the unit's command line and the
// README's completion commands must work with them.
var buildBins = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "vtpmm-packaging-")
	if err != nil {
		return "", err
	}
	for _, b := range []string{"vtpmd", "vtpmctl"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, b), "github.com/vtpmm/vtpmm/cmd/"+b)
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("go build %s: %v\n%s", b, err, out)
		}
	}
	return dir, nil
})

func bins(t *testing.T) string {
	t.Helper()
	dir, err := buildBins()
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestMain(m *testing.M) {
	code := m.Run()
	if dir, err := buildBins(); err == nil && dir != "" {
		_ = os.RemoveAll(dir)
	}
	os.Exit(code)
}

func run(bin string, args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// TestExecStartIsRealCommand runs the unit's ExecStart command line with
// --help against the real vtpmd: cobra parses every flag and resolves the
// subcommand before it prints help, so an unknown flag or command fails.
func TestExecStartIsRealCommand(t *testing.T) {
	u := loadUnit(t)
	argv := strings.Fields(u.one(t, "Service", "ExecStart"))
	if len(argv) < 2 || filepath.Base(argv[0]) != "vtpmd" {
		t.Fatalf("ExecStart %v does not run vtpmd", argv)
	}
	vtpmd := filepath.Join(bins(t), "vtpmd")
	out, err := run(vtpmd, append(argv[1:], "--help")...)
	if err != nil || !strings.Contains(out, "vtpmd run [flags]") {
		t.Fatalf("vtpmd %v --help: %v\n%s", argv[1:], err, out)
	}
	// The check has teeth: a wrong flag or command is refused.
	for _, bad := range [][]string{
		{"--confg", "/etc/vtpmm/vtpmd.yaml", "run", "--help"},
		{"--config", "/etc/vtpmm/vtpmd.yaml", "serve", "--help"},
	} {
		if out, err := run(vtpmd, bad...); err == nil && strings.Contains(out, "vtpmd run [flags]") {
			t.Errorf("vtpmd %v was accepted:\n%s", bad, out)
		}
	}
}

// TestCompletion: the README's completion commands produce bash scripts.
func TestCompletion(t *testing.T) {
	dir := bins(t)
	for _, b := range []string{"vtpmctl", "vtpmd"} {
		out, err := run(filepath.Join(dir, b), "completion", "bash")
		if err != nil || !strings.HasPrefix(out, "# bash completion") || !strings.Contains(out, "__start_"+b) {
			t.Errorf("%s completion bash: %v\n%.200s", b, err, out)
		}
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"vtpmctl completion bash > /etc/bash_completion.d/vtpmctl",
		"vtpmd completion bash > /etc/bash_completion.d/vtpmd",
		"install -m 0644 packaging/vtpmd.service /etc/systemd/system/vtpmd.service",
		"install -m 0600 packaging/vtpmd.yaml /etc/vtpmm/vtpmd.yaml",
	} {
		if !bytes.Contains(readme, []byte(want)) {
			t.Errorf("README.md lacks %q", want)
		}
	}
}
