//! The config file's parsing and validation.

use super::*;

fn parse(text: &str) -> Result<Settings, ConfigError> {
    toml::from_str::<FileConfig>(text)
        .map_err(|e| err("(file)", e.to_string()))?
        .validate()
}

#[test]
fn defaults_are_valid() {
    let s = parse("").unwrap();
    assert_eq!(s.listen.to_string(), "127.0.0.1:50051");
    assert_eq!(s.model_name, "smollm2-135m-instruct");
}

#[test]
fn the_shipped_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/ferroserve.toml");
    FileConfig::load(&path, true).unwrap().validate().unwrap();
}

#[test]
fn errors_name_the_key() {
    let e = parse("[server]\nlisten = \"nowhere\"").unwrap_err();
    assert_eq!(e.key, "server.listen");
    let e = parse("[model]\ndevice = \"tpu\"").unwrap_err();
    assert_eq!(e.key, "model.device");
    let e = parse("[engine]\nqueue_capacity = 0").unwrap_err();
    assert_eq!(e.key, "engine.queue_capacity");
    let e = parse("[engine]\nmax_batch_seqs = 0").unwrap_err();
    assert_eq!(e.key, "engine.max_batch_seqs");
    let e = parse("[router]\nworkers = [\"127.0.0.1:1\"]").unwrap_err();
    assert_eq!(e.key, "router.workers[0]");
    let e = parse("[server]\nmetrics_listen = \"x\"").unwrap_err();
    assert_eq!(e.key, "server.metrics_listen");
    let e = parse("[cost]\nusd_per_hour = -2.0").unwrap_err();
    assert_eq!(e.key, "cost.usd_per_hour");
    assert!(
        parse("[server]\nmetrics_listen = \"\"")
            .unwrap()
            .metrics_listen
            .is_none()
    );
    let e = parse("[server]\ndrain_timeout_secs = -1").unwrap_err();
    assert_eq!(e.key, "server.drain_timeout_secs");
}

#[test]
fn open_servers_stay_on_loopback_unless_allowed() {
    let e = parse("[server]\nlisten = \"0.0.0.0:50051\"").unwrap_err();
    assert_eq!(e.key, "auth.keys");
    assert!(e.message.contains("--allow-unauthenticated"));
    assert!(parse("[server]\nlisten = \"0.0.0.0:50051\"\n[auth]\nallow_unauthenticated = true").is_ok());
    let keyed = format!(
        "[server]\nlisten = \"0.0.0.0:50051\"\n[[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"",
        ferroserve_admission::sha256_hex("k")
    );
    let s = parse(&keyed).unwrap();
    assert!(!s.keys.is_open());
    let e = parse("[[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"zz\"").unwrap_err();
    assert_eq!(e.key, "auth.keys[0].key_sha256");
}

#[test]
fn the_multi_tenant_sample_holds_hashes_of_the_documented_demo_keys() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/multi-tenant.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains("demo-key-alpha\"") && !text.contains("demo-admin-token\""),
        "no plaintext keys"
    );
    let s = FileConfig::load(&path, true).unwrap().validate().unwrap();
    assert_eq!(
        s.keys.authenticate(Some("Bearer demo-key-alpha")).unwrap().name,
        "alpha"
    );
    assert_eq!(s.keys.authenticate(Some("Bearer demo-key-beta")).unwrap().name, "beta");
    assert_eq!(s.keys.authorize_admin(Some("Bearer demo-admin-token")), Ok(()));
    let alpha = s.admission.tenants["alpha"].requests.unwrap();
    assert_eq!(
        (alpha.amount, alpha.burst),
        (2.0, 2),
        "alpha: 2 requests per second, burst 2"
    );
    let beta = s.admission.tenants["beta"].requests.unwrap();
    assert!(beta.amount >= 50.0, "beta is generous");
}

#[test]
fn limits_are_checked_and_a_tenants_keys_must_agree() {
    let key = |tenant: &str, extra: &str| {
        format!(
            "[[auth.keys]]\ntenant = \"{tenant}\"\nkey_sha256 = \"{}\"\n{extra}\n",
            ferroserve_admission::sha256_hex(extra)
        )
    };
    let e = parse(&key("a", "requests_per_second = -1.0")).unwrap_err();
    assert_eq!(e.key, "auth.keys[0].requests_per_second");
    let e = parse(&key("a", "request_burst = 3")).unwrap_err();
    assert_eq!(e.key, "auth.keys[0].request_burst");
    let e = parse(&format!(
        "{}{}",
        key("a", "max_in_flight = 2"),
        key("a", "max_in_flight = 3")
    ))
    .unwrap_err();
    assert_eq!(e.key, "auth.keys[1]");
    assert!(
        parse(&format!(
            "{}{}",
            key("a", "max_in_flight = 2"),
            key("a", "max_in_flight =  2")
        ))
        .is_ok()
    );
    let e = parse("[admission]\nmax_in_flight = 0").unwrap_err();
    assert_eq!(e.key, "admission.max_in_flight");
    let s = parse(&key("a", "tokens_per_minute = 600.0")).unwrap();
    assert_eq!(
        s.admission.tenants["a"].tokens.unwrap().burst,
        600,
        "default burst: a minute's worth"
    );
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let path = std::env::temp_dir().join(format!("ferroserve-cfg-{}.toml", std::process::id()));
    std::fs::write(&path, "[server]\nlistn = \"127.0.0.1:1\"\n").unwrap();
    let e = FileConfig::load(&path, true).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert!(e.to_string().contains("listn"), "{e}");
}

#[test]
fn extra_versions_need_their_own_label_and_a_file() {
    let dup =
        parse("[model]\nversion = \"a\"\n[[model.versions]]\nversion = \"a\"\npath = \"Cargo.toml\"\n").unwrap_err();
    assert!(dup.to_string().contains("model.versions[0].version"), "{dup}");
    let missing = parse("[[model.versions]]\nversion = \"b\"\npath = \"/nonexistent.gguf\"\n").unwrap_err();
    assert!(missing.to_string().contains("model.versions[0].path"), "{missing}");
    let ok = parse("[[model.versions]]\nversion = \"b\"\npath = \"Cargo.toml\"\n").unwrap();
    assert_eq!(ok.versions.len(), 1);
}

#[test]
fn versions_inherit_the_models_generation_defaults_unless_they_set_their_own() {
    let s = parse(
        "[model]\nsystem_prompt = \"Base.\"\nstop = [\"###\"]\nsampling = { temperature = 0.7, top_p = 0.9 }\n\
         [[model.versions]]\nversion = \"b\"\npath = \"Cargo.toml\"\n\
         [[model.versions]]\nversion = \"c\"\npath = \"Cargo.toml\"\nsystem_prompt = \"\"\nstop = [\"END\"]\n\
         sampling = { temperature = 0.0 }\n",
    )
    .unwrap();
    assert_eq!(s.defaults.system_prompt.as_deref(), Some("Base."));
    assert_eq!(s.defaults.sampling.map(|x| (x.temperature, x.top_p)), Some((0.7, 0.9)));
    assert_eq!(s.defaults.stop, ["###"]);
    assert_eq!(s.versions[0].defaults, s.defaults, "b inherits everything");
    let c = &s.versions[1].defaults;
    assert_eq!(c.system_prompt, None, "an empty prompt leaves it to the chat template");
    assert!(c.sampling.is_some_and(|x| x.is_greedy()), "explicitly greedy");
    assert_eq!(c.stop, ["END"]);

    let bad =
        parse("[[model.versions]]\nversion = \"b\"\npath = \"Cargo.toml\"\nsampling = { top_p = 1.5 }\n").unwrap_err();
    assert!(bad.to_string().contains("model.versions[0].sampling.top_p"), "{bad}");
    let empty_stop = parse("[model]\nstop = [\"\"]\n").unwrap_err();
    assert!(empty_stop.to_string().contains("model.stop[0]"), "{empty_stop}");
    let unknown = parse("[model]\nsampling = { temprature = 1.0 }\n").unwrap_err();
    assert!(unknown.to_string().contains("temprature"), "{unknown}");
}

#[test]
fn the_startup_split_names_declared_versions() {
    let ok = parse(
        "[model]\nversion = \"a\"\n[[model.versions]]\nversion = \"b\"\npath = \"Cargo.toml\"\n\
         [model.traffic]\nweights = { a = 95, b = 5 }\ncohorts = { beta = \"b\" }\n",
    )
    .unwrap();
    let policy = ok.traffic.unwrap();
    assert_eq!((policy.weights["a"], policy.weights["b"]), (95, 5));
    assert_eq!(policy.cohorts["beta"], "b");
    let unknown = parse("[model]\nversion = \"a\"\n[model.traffic]\nweights = { a = 1, c = 1 }\n").unwrap_err();
    assert!(unknown.to_string().contains("model.traffic.weights.c"), "{unknown}");
    let cohort = parse("[model]\nversion = \"a\"\n[model.traffic]\ncohorts = { x = \"z\" }\n").unwrap_err();
    assert!(cohort.to_string().contains("model.traffic.cohorts.x"), "{cohort}");
    let zero = parse("[model]\nversion = \"a\"\n[model.traffic]\nweights = { a = 0 }\n").unwrap_err();
    assert!(zero.to_string().contains("model.traffic.weights"), "{zero}");
    // A router of remote workers: the workers declare the versions.
    let remote = parse("[router]\nworkers = [\"http://127.0.0.1:1\"]\n[model.traffic]\nweights = { w = 1 }\n").unwrap();
    assert_eq!(remote.traffic.unwrap().weights["w"], 1);
}

#[test]
fn network_settings_are_checked_by_key() {
    let e = parse("[worker]\nlisten = \"0.0.0.0:50061\"").unwrap_err();
    assert_eq!(e.key, "worker.token_sha256");
    let token = ferroserve_admission::sha256_hex("t");
    assert!(
        parse(&format!(
            "[worker]\nlisten = \"0.0.0.0:50061\"\ntoken_sha256 = \"{token}\""
        ))
        .is_ok()
    );
    assert!(parse("[worker]\nlisten = \"0.0.0.0:50061\"\n[auth]\nallow_unauthenticated = true").is_ok());
    let e = parse("[worker]\ntoken_sha256 = \"abc\"").unwrap_err();
    assert_eq!(e.key, "worker.token_sha256");
    let e = parse("[server]\ntls_cert = \"/nonexistent.pem\"\ntls_key = \"/nonexistent.key\"").unwrap_err();
    assert_eq!(e.key, "server.tls_cert");
    let e = parse("[server]\ntls_key = \"Cargo.toml\"").unwrap_err();
    assert_eq!(e.key, "server.tls_cert");
    let e = parse("[worker]\ntls_client_ca = \"Cargo.toml\"").unwrap_err();
    assert_eq!(e.key, "worker.tls_client_ca");
    let e = parse("[router]\nworker_token_file = \"/nonexistent-token\"").unwrap_err();
    assert_eq!(e.key, "router.worker_token_file");
    let e = parse("[connections]\nkeepalive_interval_secs = 0").unwrap_err();
    assert_eq!(e.key, "connections.keepalive_interval_secs");
    let e = parse("[connections]\nmax_connections = 0").unwrap_err();
    assert_eq!(e.key, "connections.max_connections");
    let s = parse("[connections]\nmax_connection_age_secs = 600").unwrap();
    assert_eq!(s.connections.max_connection_age, Some(Duration::from_secs(600)));
}

#[test]
fn request_limits_and_priority_ranges_are_checked() {
    let e = parse("[router]\nmax_messages = 0").unwrap_err();
    assert_eq!(e.key, "router.max_messages");
    let e = parse("[router]\nmax_prompt_bytes = 2000000").unwrap_err();
    assert_eq!(e.key, "router.max_prompt_bytes");
    let s = parse("[router]\nmax_request_bytes = 4194304\nmax_prompt_bytes = 2000000").unwrap();
    assert_eq!(s.request_limits.max_prompt_bytes, 2_000_000);
    let key = ferroserve_admission::sha256_hex("k");
    let e = parse(&format!(
        "[[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{key}\"\nrequest_priorities = [5, 1]"
    ))
    .unwrap_err();
    assert_eq!(e.key, "auth.keys[0].request_priorities");
    let s = parse(&format!(
        "[[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{key}\"\nrequest_priorities = [-2, 7]"
    ))
    .unwrap();
    let tenant = s.keys.authenticate(Some("Bearer k")).unwrap();
    assert_eq!((tenant.clamp_priority(100), tenant.clamp_priority(-100)), (7, -2));
    let open = parse("").unwrap();
    assert_eq!(open.keys.authenticate(None).unwrap().clamp_priority(9), 0);
}
