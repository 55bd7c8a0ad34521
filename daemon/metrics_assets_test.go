package daemon

import (
	"encoding/json"
	"errors"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.yaml.in/yaml/v2"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// exportedMetrics registers the daemon's collector on a registry and returns
// the names the registry gathers. A daemon exports per-VM series only for
// VMs it replicates, so the collector is wrapped to emit one sample for each
// Desc it describes; the registry (pedantic: it checks each sample against
// its Desc) then names every metric the daemon can export.
func exportedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(everyDesc{newCollector(nil)}); err != nil {
		t.Fatal(err)
	}
	for _, c := range append(newReplicaEvents().collectors(), newShipEvents().collectors()...) {
		if err := reg.Register(everyDesc{c}); err != nil {
			t.Fatal(err)
		}
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
	}
	if len(names) < 20 {
		t.Fatalf("gathered %d metrics from the daemon's collector", len(names))
	}
	return names
}

// everyDesc describes what its collector describes and collects one gauge
// for each of those Descs, with as many label values as the Desc takes.
type everyDesc struct{ c prometheus.Collector }

func (e everyDesc) Describe(ch chan<- *prometheus.Desc) { e.c.Describe(ch) }

func (e everyDesc) Collect(ch chan<- prometheus.Metric) {
	descs := make(chan *prometheus.Desc)
	go func() { e.c.Describe(descs); close(descs) }()
	for d := range descs {
		var m prometheus.Metric
		err := errors.New("no label count tried")
		for labels := []string{}; err != nil && len(labels) <= 4; labels = append(labels, "x") {
			m, err = prometheus.NewConstMetric(d, prometheus.GaugeValue, 1, labels...)
		}
		if err != nil {
			m = prometheus.NewInvalidMetric(d, err)
		}
		ch <- m
	}
}

// metricName matches the metric names a PromQL expression refers to.
var metricName = regexp.MustCompile(`\bvdrepl_[a-z0-9_]+`)

// dashboardQueries returns every PromQL expression in a Grafana dashboard:
// the panels' targets (expr) and the variables' queries (definition,
// query), nested rows included.
func dashboardQueries(v any, out *[]string) {
	switch v := v.(type) {
	case map[string]any:
		for k, e := range v {
			if s, ok := e.(string); ok && (k == "expr" || k == "definition" || k == "query") {
				*out = append(*out, s)
				continue
			}
			dashboardQueries(e, out)
		}
	case []any:
		for _, e := range v {
			dashboardQueries(e, out)
		}
	}
}

// alertRules is the part of a Prometheus rule file the check reads.
type alertRules struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Record      string            `yaml:"record"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

// TestGrafanaDashboardMetrics parses scripts/grafana-dashboard.json and
// checks that each metric its queries name is one the daemon exports, and
// that it shows lag against frequency, pending bytes, cycle sizes and errors.
func TestGrafanaDashboardMetrics(t *testing.T) {
	exported := exportedMetrics(t)
	data, err := os.ReadFile("../scripts/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash map[string]any
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	if dash["uid"] == nil || dash["title"] == nil || dash["panels"] == nil {
		t.Fatal("grafana-dashboard.json lacks uid, title or panels")
	}
	var queries []string
	dashboardQueries(dash, &queries)
	used := map[string]bool{}
	for _, q := range queries {
		for _, name := range metricName.FindAllString(q, -1) {
			used[name] = true
			if !exported[name] {
				t.Errorf("grafana-dashboard.json queries %s, which the daemon does not export (query %q)", name, q)
			}
		}
	}
	for _, name := range []string{
		"vdrepl_replication_lag_seconds", "vdrepl_replication_frequency_seconds", // lag vs frequency
		"vdrepl_replication_pending_bytes",                                                   // pending bytes
		"vdrepl_replication_cycle_wire_bytes_avg", "vdrepl_replication_cycle_wire_bytes_max", // cycle sizes
		"vdrepl_replication_retries_total", "vdrepl_replication_cycles_missed_total", "vdrepl_replication_health", // errors
		"vdrepl_replica_health", // the replica's side: are cycles arriving
	} {
		if !used[name] {
			t.Errorf("grafana-dashboard.json never queries %s", name)
		}
	}
	// Every panel's datasource is the dashboard's variable, so the JSON
	// imports into any Grafana with a Prometheus data source.
	for _, p := range dash["panels"].([]any) {
		p := p.(map[string]any)
		if p["type"] == "row" {
			continue
		}
		ds, _ := p["datasource"].(map[string]any)
		if ds["uid"] != "${datasource}" {
			t.Errorf("panel %q: datasource %v, want the ${datasource} variable", p["title"], p["datasource"])
		}
	}
}

// TestAlertRulesMetrics parses scripts/vdrepl-alerts.yml (strictly: a
// misspelt field is an error) and checks each rule's metric names, and that
// the two alerts the operators asked for are there.
func TestAlertRulesMetrics(t *testing.T) {
	exported := exportedMetrics(t)
	data, err := os.ReadFile("../scripts/vdrepl-alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	var rules alertRules
	if err := yaml.UnmarshalStrict(data, &rules); err != nil {
		t.Fatalf("vdrepl-alerts.yml: %v", err)
	}
	alerts := map[string]string{}
	for _, g := range rules.Groups {
		if g.Name == "" || len(g.Rules) == 0 {
			t.Errorf("group %q: want a name and rules", g.Name)
		}
		for _, r := range g.Rules {
			if r.Alert == "" || r.Expr == "" {
				t.Errorf("rule %+v: want alert and expr", r)
				continue
			}
			alerts[r.Alert] = r.Expr
			if r.For != "" {
				if _, err := time.ParseDuration(r.For); err != nil {
					t.Errorf("%s: for %q: %v", r.Alert, r.For, err)
				}
			}
			if s := r.Labels["severity"]; s != "warning" && s != "critical" {
				t.Errorf("%s: severity %q, want warning or critical", r.Alert, s)
			}
			if r.Annotations["summary"] == "" {
				t.Errorf("%s: no summary annotation", r.Alert)
			}
			names := metricName.FindAllString(r.Expr, -1)
			if len(names) == 0 {
				t.Errorf("%s: expr %q names no vdrepl metric", r.Alert, r.Expr)
			}
			for _, name := range names {
				if !exported[name] {
					t.Errorf("%s: expr %q: the daemon does not export %s", r.Alert, r.Expr, name)
				}
			}
		}
	}
	lag := alerts["VdreplReplicationLagging"]
	if !strings.Contains(lag, "vdrepl_replication_lag_seconds") || !strings.Contains(lag, "2 * vdrepl_replication_frequency_seconds") {
		t.Errorf("VdreplReplicationLagging: expr %q, want lag over 2 intervals", lag)
	}
	if crit := alerts["VdreplVMCritical"]; !strings.Contains(crit, "vdrepl_replication_health == 2") {
		t.Errorf("VdreplVMCritical: expr %q, want health critical (2)", crit)
	}
	if rep := alerts["VdreplReplicaNoCycles"]; !strings.Contains(rep, "vdrepl_replica_health") {
		t.Errorf("VdreplReplicaNoCycles: expr %q, want the replica's health", rep)
	}
}

// The replica's health as a gauge, and as the warnings of `vdrepl status`.
func TestReplicaHealthReported(t *testing.T) {
	for h, want := range map[string]float64{"normal": 0, "warning": 1, "critical": 2, "": 0} {
		if got := replicaHealthValue(h); got != want {
			t.Errorf("vdrepl_replica_health of %q: %v, want %v", h, got, want)
		}
	}
	reps := []control.ReplicaStatus{
		{Replica: wire.Replica{VM: "web1"}, Health: "normal"},
		{Replica: wire.Replica{VM: "db1"}, Health: "warning", HealthReason: "no cycle from p1 since 2026-03-01T12:00:00Z (1m14s ago, frequency 30s)"},
	}
	got := replicaWarnings(reps)
	want := "replica VM db1: health warning: no cycle from p1 since 2026-03-01T12:00:00Z (1m14s ago, frequency 30s); check the primary host and `vdrepl doctor` there"
	if len(got) != 1 || got[0] != want {
		t.Errorf("warnings %q, want %q", got, want)
	}
}
