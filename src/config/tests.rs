//! The configuration's unit tests.

use super::file::parse_backend_url;
use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.yaml"))
}

const MINIMAL: &str = "listeners:\n  - address: 127.0.0.1:8080\nadmin:\n  address: 127.0.0.1:9090\nbackends:\n  - url: http://127.0.0.1:8001\n  - url: http://127.0.0.1:8002\nrouting:\n  policy: round-robin\n";

#[test]
fn the_issue_example_parses_with_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(
        c.listeners,
        vec![Listener::plain("127.0.0.1:8080".parse().unwrap())]
    );
    assert_eq!(c.backends.len(), 2);
    assert_eq!(c.backends[1].name, "127.0.0.1:8002");
    assert_eq!(c.policy, Policy::RoundRobin);
    let text = MINIMAL.replace("routing:\n  policy: round-robin\n", "");
    assert_eq!(
        parse(&text).unwrap().policy,
        Policy::Vllm,
        "the default policy"
    );
    assert_eq!(c.limits, ClientLimits::default());
    assert!(c.pool_idle_timeout < Duration::from_secs(5));
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let text = MINIMAL.replace(
        "  - url: http://127.0.0.1:8002",
        "  - urll: http://127.0.0.1:8002",
    );
    let e = parse(&text).unwrap_err().to_string();
    assert!(e.starts_with("test.yaml:7:"), "{e}");
    assert!(e.contains("backends[1]"), "{e}");
    assert!(
        e.contains("unknown key `urll` (did you mean `url`?)"),
        "{e}"
    );
}

#[test]
fn affinity_settings_are_read_and_bad_ones_located() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.affinity, Affinity::default());
    assert!(c.affinity.used_by(Policy::Affinity) && !c.affinity.used_by(Policy::RoundRobin));
    let text = MINIMAL.replace(
        "  policy: round-robin\n",
        "  policy: affinity\n  affinity:\n    enabled: false\n    load_factor: 2\n    \
         prefix_bytes: 1KiB\n    session_header: X-Conversation\n    kv_share: 0.4\n    \
         long_lived_after: 45s\n",
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.policy, Policy::Affinity);
    assert_eq!(
        c.affinity,
        Affinity {
            enabled: false,
            load_factor: 2.0,
            prefix_bytes: 1024,
            session_header: "x-conversation".into(),
            placement: PlacementSettings {
                kv_share: 0.4,
                long_lived_after: Duration::from_secs(45),
            },
        }
    );
    // Off, but `policy: affinity` uses it anyway; `vllm` does not.
    assert!(c.affinity.used_by(Policy::Affinity) && !c.affinity.used_by(Policy::Vllm));
    for (bad, key) in [
        ("    load_factor: 0.5\n", "routing.affinity.load_factor"),
        ("    prefix_bytes: 10\n", "routing.affinity.prefix_bytes"),
        ("    kv_share: 1.5\n", "routing.affinity.kv_share"),
        ("    kv_share: -0.1\n", "routing.affinity.kv_share"),
        (
            "    long_lived_after: 1h\n",
            "routing.affinity.long_lived_after",
        ),
        (
            "    session_header: \"not a header\"\n",
            "routing.affinity.session_header",
        ),
        ("    sticky: yes\n", "sticky"),
    ] {
        let text = MINIMAL.replace(
            "  policy: round-robin\n",
            &format!("  policy: round-robin\n  affinity:\n{bad}"),
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.starts_with("test.yaml:"), "{e}");
        assert!(e.contains(key), "{key}: {e}");
    }
}

#[test]
fn the_default_model_and_aliases_are_model_names() {
    let with = |v: &str| {
        MINIMAL.replace(
            "  policy: round-robin\n",
            &format!("  policy: round-robin\n  default_model: {v}\n"),
        )
    };
    assert_eq!(parse(MINIMAL).unwrap().default_model, None);
    assert_eq!(
        parse(&with("llama-3-8b")).unwrap().default_model.as_deref(),
        Some("llama-3-8b")
    );
    for bad in ["\"\"", "\"a\\nb\""] {
        let e = parse(&with(bad)).unwrap_err().to_string();
        assert!(
            e.starts_with("test.yaml:") && e.contains("routing.default_model"),
            "{e}"
        );
    }
    let aliases = |v: &str| {
        MINIMAL.replace(
            "  policy: round-robin\n",
            &format!("  policy: round-robin\n  model_aliases:\n{v}"),
        )
    };
    let c = parse(&aliases("    gpt-4o: llama\n    \"o1\": sql-lora\n")).unwrap();
    assert_eq!(c.model_aliases.len(), 2);
    assert_eq!(c.model_aliases["o1"], "sql-lora");
    for (bad, says) in [
        ("    a: b\n    b: c\n", "is an alias itself"),
        ("    a: \"\"\n", "not empty"),
    ] {
        let e = parse(&aliases(bad)).unwrap_err().to_string();
        assert!(e.starts_with("test.yaml:11:"), "{e}");
        assert!(
            e.contains("routing.model_aliases.a") && e.contains(says),
            "{e}"
        );
    }
}

#[test]
fn bad_values_are_located() {
    let e = parse(&MINIMAL.replace("127.0.0.1:9090", "localhost-ish"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("test.yaml:4:"), "{e}");
    assert!(e.contains("admin.address"), "{e}");
    let e = parse(&MINIMAL.replace("round-robin", "fastest"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("test.yaml:9:"), "{e}");
    assert!(e.contains("routing.policy"), "{e}");
    let e = parse(&format!("{MINIMAL}limits:\n  max_body_size: 12 parsecs\n"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("test.yaml:11:") && e.contains("limits.max_body_size"),
        "{e}"
    );
}

#[test]
fn semantic_errors_name_the_key_and_its_line() {
    let e = parse("listeners:\n  - address: 127.0.0.1:8080\nbackends: []\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("test.yaml:3:1: `backends`"), "{e}");
    let dup = MINIMAL.replace("8002", "8001");
    let e = parse(&dup).unwrap_err().to_string();
    assert!(
        e.contains("`backends[1]`") && e.contains("test.yaml:7:"),
        "{e}"
    );
    // A name goes into a response header: one that cannot is refused at load, not
    // on every request.
    for bad in ["\"gpu\\u00e9\"", "\"a\\tb\"", "\"\""] {
        let text = MINIMAL.replace(
            "  - url: http://127.0.0.1:8002\n",
            &format!("  - url: http://127.0.0.1:8002\n    name: {bad}\n"),
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("`backends[1].name`") && e.contains("test.yaml:8:"),
            "{bad}: {e}"
        );
    }
    let ok = MINIMAL.replace(
        "  - url: http://127.0.0.1:8002\n",
        "  - url: http://127.0.0.1:8002\n    name: gpu 2 (spare)\n",
    );
    assert_eq!(parse(&ok).unwrap().backends[1].name, "gpu 2 (spare)");
}

#[test]
fn an_all_addresses_entry_makes_one_backend_per_address_of_a_name() {
    let c = parse("backends:\n  - url: http://localhost:8000\n    addresses: all\n    weight: 2\n")
        .unwrap();
    let names: Vec<&str> = c.backends.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["localhost:8000@127.0.0.1"]);
    let b = &c.backends[0];
    assert_eq!(b.group.as_deref(), Some("localhost:8000"));
    assert_eq!(b.resolve.as_deref(), Some("localhost:8000"));
    assert_eq!(b.weight, 2.0, "the entry's settings");
    let e = parse("backends:\n  - url: http://127.0.0.1:8000\n    addresses: all\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`backends[0].addresses`"), "{e}");
    // A name with no address yet: no backend until it has (`.invalid` never resolves).
    let c =
        parse("backends:\n  - url: http://replicas.invalid:8000\n    addresses: all\n").unwrap();
    assert!(c.backends.is_empty());
    assert_eq!(c.groups.len(), 1);
    assert_eq!(
        c.groups[0].resolve.as_deref(),
        Some("replicas.invalid:8000")
    );
    // Nor does a single backend's: it waits under its own name.
    let c = parse("backends:\n  - url: http://gpu-0.invalid:8000\n    models: [m]\n").unwrap();
    assert!(c.backends.is_empty());
    assert_eq!(c.unresolved.len(), 1);
    assert_eq!(c.unresolved[0].name, "gpu-0.invalid:8000");
    assert_eq!(
        c.unresolved[0].resolve.as_deref(),
        Some("gpu-0.invalid:8000")
    );
    assert!(c.awaits("m") && !c.awaits("other"));
    let e = parse("backends:\n  - url: http://a.invalid:8000\n    name: x\n  - url: http://b.invalid:8000\n    name: x\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`backends[1]`") && e.contains("listed twice"),
        "{e}"
    );
    // A host that is not spelled as a name is a mistake in the file, not a name
    // waiting for its address.
    for bad in [
        "http://gpu 0:8000",
        "http://gpu..lan:8000",
        "http://gpu!:8000",
        "http://gpu:80x",
    ] {
        let e = parse(&format!("backends:\n  - url: {bad}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("test.yaml:2:") && e.contains("`backends[0].url`"),
            "{bad}: {e}"
        );
    }
    let e = parse("backends:\n  - url: http://localhost:8000\n    addresses: some\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("backends[0].addresses"), "{e}");
}

#[test]
fn cors_origins_are_read_and_a_bad_one_located() {
    assert_eq!(parse(MINIMAL).unwrap().cors, None, "off by default");
    let c = parse(&format!(
        "{MINIMAL}cors:\n  allowed_origins:\n    - https://app.example.com\n    - app.example.com\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        c.starts_with("test.yaml:13:") && c.contains("`cors.allowed_origins[1]`"),
        "{c}"
    );
    let ok = parse(&format!("{MINIMAL}cors:\n  allowed_origins: [\"*\"]\n")).unwrap();
    assert!(ok.cors.is_some());
}

#[test]
fn a_duration_that_would_fail_every_attempt_or_spin_is_refused() {
    for (section, key, value, message) in [
        ("timeouts", "connect", "0s", "must be above zero"),
        ("health", "timeout", "0ms", "must be above zero"),
        ("discovery", "timeout", "0s", "must be above zero"),
        ("discovery", "scrape_timeout", "0s", "must be above zero"),
        (
            "discovery",
            "models_interval",
            "0s",
            "must be at least 10ms",
        ),
        (
            "discovery",
            "scrape_interval",
            "5ms",
            "must be at least 10ms",
        ),
    ] {
        let e = parse(&format!("{MINIMAL}{section}:\n  {key}: {value}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("test.yaml:11:3: `{section}.{key}`: {message}")),
            "{e}"
        );
        let ok = parse(&format!("{MINIMAL}{section}:\n  {key}: 20ms\n"));
        assert!(ok.is_ok(), "{section}.{key}: 20ms: {ok:?}");
    }
}

#[test]
fn urls_sizes_and_durations() {
    assert!(parse_backend_url("http://127.0.0.1:8000/").is_ok());
    assert_eq!(
        parse_backend_url("http://127.0.0.1")
            .unwrap()
            .addrs
            .unwrap()[0]
            .port(),
        80
    );
    assert!(parse_backend_url("127.0.0.1:8000").is_err());
    assert!(parse_backend_url("http://127.0.0.1:8000/v1").is_err());
    let https = parse_backend_url("https://localhost").unwrap();
    assert_eq!(https.port, 443);
    assert_eq!(https.addrs.as_ref().unwrap()[0].port(), 443);
    assert_eq!(https.tls_host.as_deref(), Some("localhost"));
    assert_eq!(https.url, "https://localhost");
    let v6 = parse_backend_url("https://[::1]:8443").unwrap();
    assert_eq!(v6.tls_host.as_deref(), Some("::1"));
    assert_eq!(
        parse_backend_url("http://127.0.0.1:1").unwrap().tls_host,
        None
    );
    let e = parse("backends:\n  - url: http://127.0.0.1:1\n    tls_verify: false\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("backends[0].tls_verify") && e.contains("https"),
        "{e}"
    );
    assert_eq!(parse_size("32MiB").unwrap(), 32 << 20);
    assert_eq!(parse_size("1000").unwrap(), 1000);
    assert!(parse_size("-1").is_err());
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
    assert!(parse_duration("2 fortnights").is_err());
}

#[test]
fn shipped_configs_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in [
        "conf/vllm-edge.yaml",
        "conf/minimal.yaml",
        "deploy/gateway.yaml",
    ] {
        Config::load(&root.join(f)).unwrap_or_else(|e| panic!("{e}"));
    }
    // The Kubernetes ConfigMap's configuration, with the keys where the Secret is mounted.
    let manifests = std::fs::read_to_string(root.join("deploy/kubernetes/gateway.yaml")).unwrap();
    let map: serde_yaml::Value = manifests
        .split("\n---\n")
        .map(|d| serde_yaml::from_str::<serde_yaml::Value>(d).unwrap())
        .find(|d| d["kind"] == "ConfigMap")
        .expect("a ConfigMap");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::copy(
        root.join("deploy/api-keys"),
        dir.path().join("keys/api-keys"),
    )
    .unwrap();
    let conf = dir.path().join("vllm-edge.yaml");
    std::fs::write(&conf, map["data"]["vllm-edge.yaml"].as_str().unwrap()).unwrap();
    let c = Config::load(&conf).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.shared_limits.is_some() && c.api_keys.is_some());
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any text: a configuration or an error, never a panic.
        #[test]
        fn any_text_is_loaded_or_refused(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }

        /// Any value under any limit: accepted, or refused with the file, the line and
        /// the key.
        #[test]
        fn a_refused_limit_names_file_line_and_key(
            key in prop::sample::select(vec![
                "max_body_size", "body_read_timeout", "body_min_rate", "max_header_size",
                "max_header_count", "header_read_timeout", "keepalive_timeout",
                "max_connections", "h2_max_concurrent_streams", "max_json_depth",
            ]),
            value in prop::sample::select(vec![
                "-1", "0", "1", "1.5", "abc", "[1, 2]", "{a: 1}", "''", "null", "true",
                "99999999999999999999", "1GiB", "10s", "0s", "1ms", "64KiB", "200",
            ]),
        ) {
            let text = format!("{MINIMAL}limits:\n  {key}: {value}\n");
            if let Err(e) = parse(&text) {
                let e = e.to_string();
                prop_assert!(e.contains("test.yaml:11:"), "{}", e);
                prop_assert!(e.contains(&format!("limits.{key}")), "{}", e);
            }
        }
    }
}

/// `conf/vllm-edge.yaml` shows every key with its default value (unless marked
/// "example"): what it sets must be what the code does without it.
#[test]
fn the_reference_config_shows_the_codes_defaults() {
    let reference = parse(include_str!("../../conf/vllm-edge.yaml")).unwrap();
    let bare = parse("backends:\n  - url: http://127.0.0.1:8001\n").unwrap();
    let fields = |c: &Config| {
        format!(
            "{:?}",
            (
                (&c.listeners, c.admin, c.policy, &c.default_model),
                (&c.affinity, &c.limits, c.connect_timeout, &c.timeouts),
                (
                    c.pool_idle_timeout,
                    c.max_attempts,
                    c.retry_budget_ratio,
                    c.retry_budget_min,
                    c.keepalive_pool_size,
                ),
                (
                    c.scrape_interval,
                    c.scrape_timeout,
                    c.models_interval,
                    c.discovery_timeout,
                    c.dns_interval,
                    &c.health,
                ),
                (c.grace_period, c.graceful_shutdown_timeout, &c.upgrade_sock),
                (c.log_format, c.access_log),
                (&c.flow, c.engine_priority),
            )
        )
    };
    assert_eq!(fields(&reference), fields(&bare));
    // Its example backend shows the defaults of the keys it leaves out.
    let first = &reference.backends[0];
    assert_eq!(
        (first.weight, first.drain, first.max_concurrent_requests),
        (defaults::BACKEND_WEIGHT, false, None)
    );
}

#[test]
fn kv_events_and_tokenizers_are_read_and_bad_ones_located() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-tokenizer");
    let text = MINIMAL
        .replace(
            "  - url: http://127.0.0.1:8001\n",
            "  - url: http://127.0.0.1:8001\n    kv_events: tcp://127.0.0.1:5557\n    \
             kv_events_replay: tcp://127.0.0.1:5558\n",
        )
        .replace(
            "  policy: round-robin\n",
            &format!("  policy: vllm\n  tokenizers:\n    tiny: {dir}\n"),
        );
    let c = parse(&text).unwrap();
    assert_eq!(
        c.backends[0].kv_events,
        Some(KvEvents {
            endpoint: "tcp://127.0.0.1:5557".into(),
            replay: Some("tcp://127.0.0.1:5558".into()),
        })
    );
    assert_eq!(c.backends[1].kv_events, None);
    assert!(c.tokenizers["tiny"].has_chat_template());

    let bad = text
        .replace("tcp://127.0.0.1:5557", "tcp://*:5557")
        .replace("tcp://127.0.0.1:5558", "127.0.0.1:5558")
        .replace(dir, "/nonexistent/model");
    let e = parse(&bad).unwrap_err().to_string();
    assert!(e.contains("backends[0].kv_events"), "{e}");
    assert!(e.contains("where the engine binds"), "{e}");
    assert!(e.contains("backends[0].kv_events_replay"), "{e}");
    assert!(e.contains("must be tcp://HOST:PORT"), "{e}");
    assert!(e.contains("routing.tokenizers.tiny"), "{e}");
    assert!(e.contains("/nonexistent/model/tokenizer.json"), "{e}");
    let orphan = MINIMAL.replace(
        "  - url: http://127.0.0.1:8001\n",
        "  - url: http://127.0.0.1:8001\n    kv_events_replay: tcp://127.0.0.1:5558\n",
    );
    let e = parse(&orphan).unwrap_err().to_string();
    assert!(e.contains("set `kv_events` too"), "{e}");
}

#[test]
fn a_kv_events_group_member_reads_its_own_address() {
    let group = BackendConfig {
        kv_events: Some(KvEvents {
            endpoint: "tcp://vllm.ns.svc:5557".into(),
            replay: Some("tcp://vllm.ns.svc:5558".into()),
        }),
        ..BackendConfig::new(
            "vllm",
            "http://vllm.ns.svc:8000",
            "10.0.0.1:8000".parse().unwrap(),
        )
    };
    let member = group.at("10.0.0.7:8000".parse().unwrap());
    assert_eq!(
        member.kv_events,
        Some(KvEvents {
            endpoint: "tcp://10.0.0.7:5557".into(),
            replay: Some("tcp://10.0.0.7:5558".into()),
        })
    );
}

#[test]
fn shared_limits_are_read_and_bad_ones_located() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.txt"), "team sk-team rpm=6\n").unwrap();
    std::fs::write(dir.path().join("redis.pw"), "s3cret\n").unwrap();
    let at = |extra: &str| {
        let path = dir.path().join("gateway.yaml");
        let text = format!("{MINIMAL}auth:\n  api_keys_file: keys.txt\n{extra}");
        Config::parse(&text, &path)
    };
    assert!(at("").unwrap().shared_limits.is_none(), "off by default");
    let c =
        at("  shared:\n    redis: redis://10.0.0.5:6379\n    password_file: redis.pw\n").unwrap();
    let s = c.shared_limits.unwrap();
    let s = s.settings();
    assert_eq!(
        (
            s.on_error,
            s.timeout,
            s.password.as_ref().map(|p| p.expose())
        ),
        (
            crate::auth::shared::OnRedisError::Local,
            defaults::SHARED_LIMITS_TIMEOUT,
            Some("s3cret")
        )
    );
    for (extra, key, words) in [
        (
            "  shared:\n    on_redis_error: deny\n",
            "`auth.shared`",
            "`redis` is missing",
        ),
        (
            "  shared:\n    redis: http://10.0.0.5\n",
            "`auth.shared.redis`",
            "not a Redis URL",
        ),
        (
            "  shared:\n    redis: redis://10.0.0.5\n    on_redis_error: ignore\n",
            "auth.shared.on_redis_error",
            "local",
        ),
        (
            "  shared:\n    redis: redis://10.0.0.5\n    password_file: nope.pw\n",
            "`auth.shared.password_file`",
            "nope.pw",
        ),
        (
            "  shared:\n    redis: redis://10.0.0.5\n    timeout: 0s\n",
            "`auth.shared.timeout`",
            "above 0",
        ),
        (
            "  shared:\n    redis: redis://10.0.0.5\n    ca_file: redis.pw\n",
            "`auth.shared.ca_file`",
            "rediss://",
        ),
        (
            "  shared:\n    redis: rediss://10.0.0.5\n    ca_file: nope.pem\n",
            "`auth.shared.ca_file`",
            "cannot read",
        ),
    ] {
        let e = at(extra).unwrap_err().to_string();
        assert!(
            e.contains("gateway.yaml:1") && e.contains(key) && e.contains(words),
            "{extra}: {e}"
        );
    }
    // Sharing the keys' limits needs keys.
    let e = parse(&format!(
        "{MINIMAL}auth:\n  shared:\n    redis: redis://10.0.0.5\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`auth.shared`") && e.contains("api_keys_file"),
        "{e}"
    );
}

#[test]
fn otlp_settings_are_read_and_bad_ones_located() {
    assert_eq!(parse(MINIMAL).unwrap().otlp, None, "off by default");
    let at = |extra: &str| parse(&format!("{MINIMAL}tracing:\n  otlp:\n{extra}"));
    let c = at("    endpoint: http://otel:4318\n").unwrap();
    assert_eq!(
        c.otlp,
        Some(OtlpSettings {
            endpoint: "http://otel:4318/v1/traces".into(),
            sample_ratio: defaults::OTLP_SAMPLE_RATIO
        })
    );
    let c = at("    endpoint: https://otel.example/custom/path\n    sample_ratio: 0.25\n").unwrap();
    assert_eq!(
        c.otlp.unwrap(),
        OtlpSettings {
            endpoint: "https://otel.example/custom/path".into(),
            sample_ratio: 0.25
        }
    );
    for (extra, key, words) in [
        (
            "    sample_ratio: 0.5\n",
            "`tracing.otlp`",
            "`endpoint` is missing",
        ),
        (
            "    endpoint: grpc://otel:4317\n",
            "`tracing.otlp.endpoint`",
            "http://",
        ),
        (
            "    endpoint: otel:4318\n",
            "`tracing.otlp.endpoint`",
            "http://",
        ),
        (
            "    endpoint: http://otel:4318\n    sample_ratio: 1.5\n",
            "`tracing.otlp.sample_ratio`",
            "between 0 and 1",
        ),
    ] {
        let e = at(extra).unwrap_err().to_string();
        assert!(
            e.starts_with("test.yaml:1") && e.contains(key) && e.contains(words),
            "{extra}: {e}"
        );
    }
}
