//! The Kubernetes manifests (deploy/k8s) against the binary and the planner: the KEDA object's rules are the
//! simulator's (`ScalingRules::default()`), every metric a manifest queries is in the catalogue, and the
//! ports, probes and drain timings of the Deployments match the configs they mount. Rendering, schema
//! validation, checkov and `--check-config` on the ConfigMap's configs are `scripts/check-deploy.sh`'s
//! (`.ci/run` runs it).

mod support;

use ferroserve_plan::scaling::{MetricType, Policy, ScalingRules, Signal, Trigger};
use ferroserve_telemetry::names;
use serde_json::Value;
use support::repo;

/// Every YAML document of a file, as JSON values.
fn yaml(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn toml_file(path: &str) -> toml::Table {
    let text = std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.parse().unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The document of `kind` named `name`.
fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

fn number(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap(),
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("{s:?} is not a number")),
        other => panic!("{other} is not a number"),
    }
}

/// The signal a trigger's PromQL reads, and its `clamp_max` cap.
fn signal_of(query: &str) -> (Signal, Option<f64>) {
    let signal = [
        (names::RUNNING_REQUESTS, Signal::Running),
        (names::WAITING_REQUESTS, Signal::Waiting),
        (names::KV_CACHE_USAGE_RATIO, Signal::KvUsage),
        (names::TIME_TO_FIRST_TOKEN_SECONDS, Signal::TtftP99),
    ]
    .into_iter()
    .find(|(metric, _)| query.contains(metric))
    .unwrap_or_else(|| panic!("{query}: reads none of the simulator's signals"))
    .1;
    let cap = query
        .strip_prefix("clamp_max(")
        .and_then(|q| q.strip_suffix(')'))
        .and_then(|q| q.rsplit_once(", "))
        .map(|(_, cap)| cap.parse().expect("a numeric cap"));
    (signal, cap)
}

fn policies(v: &Value) -> Vec<Policy> {
    v["policies"]
        .as_array()
        .expect("policies")
        .iter()
        .map(|p| {
            let (value, period_s) = (number(&p["value"]), number(&p["periodSeconds"]));
            match p["type"].as_str() {
                Some("Percent") => Policy::Percent { value, period_s },
                Some("Pods") => Policy::Pods { value, period_s },
                other => panic!("policy type {other:?}"),
            }
        })
        .collect()
}

#[test]
fn the_keda_object_scales_by_the_simulators_rules() {
    let docs = yaml("deploy/k8s/components/keda/scaledobject.yaml");
    let spec = &object(&docs, "ScaledObject", "ferroserve-worker")["spec"];
    let behavior = &spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"];
    let triggers = spec["triggers"]
        .as_array()
        .expect("triggers")
        .iter()
        .map(|t| {
            assert_eq!(t["type"], "prometheus");
            let (signal, cap) = signal_of(t["metadata"]["query"].as_str().expect("a query"));
            let metric_type = match t["metricType"].as_str() {
                Some("AverageValue") => MetricType::AverageValue,
                Some("Value") => MetricType::Value,
                other => panic!("metricType {other:?}"),
            };
            Trigger {
                signal,
                metric_type,
                threshold: number(&t["metadata"]["threshold"]),
                cap,
            }
        })
        .collect();
    assert_eq!(
        behavior["scaleUp"]["selectPolicy"], "Max",
        "the simulator takes the most permissive policy"
    );
    let manifest = ScalingRules {
        polling_interval_s: number(&spec["pollingInterval"]),
        cooldown_s: number(&spec["cooldownPeriod"]),
        min_replicas: number(&spec["minReplicaCount"]) as u64,
        max_replicas: number(&spec["maxReplicaCount"]) as u64,
        triggers,
        scale_up_window_s: number(&behavior["scaleUp"]["stabilizationWindowSeconds"]),
        scale_up: policies(&behavior["scaleUp"]),
        scale_down_window_s: number(&behavior["scaleDown"]["stabilizationWindowSeconds"]),
        scale_down: policies(&behavior["scaleDown"]),
        tolerance: ScalingRules::default().tolerance,
    };
    assert_eq!(manifest, ScalingRules::default());
}

/// Metric names in a PromQL expression, with histogram and summary suffixes taken off.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("ferroserve_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| names::ALL.contains(b)))
            .map_or(name.clone(), str::to_string);
        found.push(base);
    }
    found
}

/// Every string under a key named in `keys`, anywhere in `v`.
fn strings_under<'a>(v: &'a Value, keys: &[&str], out: &mut Vec<&'a str>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                match child.as_str() {
                    Some(s) if keys.contains(&k.as_str()) => out.push(s),
                    _ => strings_under(child, keys, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| strings_under(i, keys, out)),
        _ => {}
    }
}

#[test]
fn every_metric_a_manifest_queries_is_in_the_catalogue() {
    let mut checked = 0;
    for file in [
        "deploy/k8s/components/keda/scaledobject.yaml",
        "deploy/k8s/components/hpa/prometheus-adapter-values.yaml",
        "deploy/k8s/base/monitoring.yaml",
    ] {
        for doc in yaml(file) {
            let mut exprs = Vec::new();
            strings_under(&doc, &["query", "seriesQuery", "metricsQuery", "expr"], &mut exprs);
            for name in exprs.iter().flat_map(|e| metrics_in(e)) {
                assert!(
                    names::ALL.contains(&name.as_str()),
                    "{file} queries {name}, not in the catalogue"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "only {checked} metric references found");
}

/// The port of a `host:port` config value.
fn port(config: &toml::Table, section: &str, key: &str) -> u64 {
    let v = config[section][key]
        .as_str()
        .unwrap_or_else(|| panic!("{section}.{key}"));
    v.rsplit_once(':').expect("host:port").1.parse().unwrap()
}

fn secs(config: &toml::Table, key: &str) -> f64 {
    config["server"][key]
        .as_float()
        .unwrap_or_else(|| panic!("server.{key}"))
}

/// Checks one Deployment's container against the config it mounts; returns its grace period.
fn check_pod(docs: &[Value], name: &str, config: &toml::Table, ports: &[(&str, u64)], health: &[&str]) -> f64 {
    let pod = &object(docs, "Deployment", name)["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "{name}: one container");
    let c = &containers[0];
    for (port_name, want) in ports {
        let declared = c["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == *port_name)
            .unwrap_or_else(|| panic!("{name}: no port named {port_name}"));
        assert_eq!(
            number(&declared["containerPort"]) as u64,
            *want,
            "{name}: port {port_name}"
        );
    }
    let grpc = ports[0].1;
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        if let Some(g) = c[probe].get("grpc") {
            assert_eq!(number(&g["port"]) as u64, grpc, "{name}: {probe} on the gRPC port");
            let service = g["service"].as_str().unwrap_or("");
            assert!(
                health.contains(&service),
                "{name}: {probe} asks for {service:?}, not one of {health:?}"
            );
        }
    }
    assert!(
        c["readinessProbe"].get("grpc").is_some(),
        "{name}: readiness on grpc.health.v1"
    );
    let prestop = number(&c["lifecycle"]["preStop"]["sleep"]["seconds"]);
    let grace = number(&pod["terminationGracePeriodSeconds"]);
    // The drain's cut-off gives handlers 1 s to send their last status (crates/net/src/drain.rs).
    let needed = prestop + secs(config, "drain_prestop_secs") + secs(config, "drain_timeout_secs") + 1.0;
    assert!(
        grace >= needed,
        "{name}: grace {grace} s < preStop + drain + cut-off = {needed} s"
    );
    grace
}

#[test]
fn ports_probes_and_drain_timings_match_the_mounted_configs() {
    use ferroserve_proto::v1::inference_server::SERVICE_NAME as INFERENCE;
    use ferroserve_proto::worker::worker_server::SERVICE_NAME as WORKER;
    let router = toml_file("deploy/k8s/base/files/router.toml");
    let worker = toml_file("deploy/k8s/base/files/worker.toml");
    let r = [
        ("grpc", port(&router, "server", "listen")),
        ("http", port(&router, "server", "http_listen")),
        ("metrics", port(&router, "server", "metrics_listen")),
    ];
    check_pod(
        &yaml("deploy/k8s/base/router.yaml"),
        "ferroserve-router",
        &router,
        &r,
        &["", INFERENCE],
    );
    let w = [
        ("grpc", port(&worker, "worker", "listen")),
        ("metrics", port(&worker, "worker", "metrics_listen")),
    ];
    let worker_docs = yaml("deploy/k8s/base/worker.yaml");
    let grace = check_pod(&worker_docs, "ferroserve-worker", &worker, &w, &["", WORKER]);
    // Workers run on spot nodes: the whole drain must fit the notice a spot node's pods get (GKE: 25 s of
    // 30; AWS gives 2 minutes).
    assert!(grace <= 25.0, "worker grace {grace} s does not fit a spot notice");
    // Routers find workers through the headless Service, on the port the workers listen on.
    let headless = object(&worker_docs, "Service", "ferroserve-worker-headless");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    let discovered = router["router"]["workers"][0].as_str().expect("router.workers");
    assert!(
        discovered.starts_with("dns://ferroserve-worker-headless.") && discovered.ends_with(&format!(":{}", w[0].1)),
        "{discovered}"
    );
}
