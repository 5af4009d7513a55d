//! `vllm-edge check`: shipped configs pass; a mistake is named by file, line and key.

use std::process::Command;

fn check(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vllm-edge"))
        .arg("check")
        .arg("-c")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn shipped_configs_pass_check() {
    for f in ["conf/minimal.yaml", "conf/vllm-edge.yaml"] {
        let (ok, out) = check(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(f));
        assert!(ok, "{f}: {out}");
    }
}

#[test]
fn a_typo_is_named_by_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.yaml");
    std::fs::write(
        &p,
        "backends:\n  - url: http://127.0.0.1:8001\nrouting:\n  polcy: round-robin\n",
    )
    .unwrap();
    let (ok, out) = check(&p);
    assert!(!ok);
    assert!(out.contains(&format!("{}:4:", p.display())), "{out}");
    assert!(
        out.contains("`routing.polcy`: unknown key `polcy` (did you mean `policy`?); expected one of `policy`"),
        "{out}"
    );

    std::fs::write(&p, "backends:\n  - url: ftp://x\n").unwrap();
    let (ok, out) = check(&p);
    assert!(
        !ok && out.contains(":2:") && out.contains("backends[0].url"),
        "{out}"
    );

    let (ok, out) = check(&dir.path().join("missing.yaml"));
    assert!(!ok && out.contains("missing.yaml"), "{out}");
}

#[test]
fn the_environment_names_the_config_and_overrides_the_addresses() {
    let minimal = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/minimal.yaml");
    let run = |envs: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vllm-edge"));
        c.arg("check")
            .env_remove("VLLM_EDGE_LISTEN")
            .env_remove("VLLM_EDGE_ADMIN");
        for (k, v) in envs {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let path = minimal.to_str().unwrap();
    let (ok, out) = run(&[("VLLM_EDGE_CONFIG", path)]);
    assert!(ok, "{out}");
    let (ok, out) = run(&[
        ("VLLM_EDGE_CONFIG", path),
        ("VLLM_EDGE_LISTEN", "127.0.0.1:7001,[::1]:7001"),
    ]);
    assert!(ok && out.contains("2 listeners"), "{out}");
    let (ok, out) = run(&[("VLLM_EDGE_CONFIG", path), ("VLLM_EDGE_ADMIN", "localhost")]);
    assert!(
        !ok && out.contains("VLLM_EDGE_ADMIN") && out.contains("`localhost`"),
        "{out}"
    );
    let (ok, out) = run(&[
        ("VLLM_EDGE_CONFIG", path),
        ("VLLM_EDGE_LISTEN", "127.0.0.1:7002"),
        ("VLLM_EDGE_ADMIN", "127.0.0.1:7002"),
    ]);
    assert!(!ok && out.contains("also a data-plane listener"), "{out}");
}

#[test]
fn every_mistake_of_a_file_is_named_at_once_in_plain_words() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.txt"), "alice sk-a rmp=5\nbob sk-b\n").unwrap();
    let p = dir.path().join("bad.yaml");
    std::fs::write(
        &p,
        "listeners:\n\
         \x20 - address: 127.0.0.1:99999\n\
         \x20 - address: 127.0.0.1:8443\n\
         \x20   tls:\n\
         \x20     cert: missing.pem\n\
         \x20     key: missing.key\n\
         auth:\n\
         \x20 api_keys_file: keys.txt\n\
         backends:\n\
         \x20 - url: http://127.0.0.1:8000\n\
         \x20   weight: heavy\n\
         \x20 - url: http://127.0.0.1:8001\n\
         routing:\n\
         \x20 polcy: round-robin\n\
         timeouts:\n\
         \x20 connect: 0s\n",
    )
    .unwrap();
    let (ok, out) = check(&p);
    assert!(!ok, "{out}");
    let at = |line: usize| format!("error: {}:{line}:", p.display());
    let missing = dir.path().join("missing.pem");
    for (line, key, says) in [
        (
            2,
            "listeners[0].address",
            "the port 99999 is out of range".to_string(),
        ),
        (
            5,
            "listeners[1].tls.cert",
            format!("{}: cannot read", missing.display()),
        ),
        (
            8,
            "auth.api_keys_file",
            "keys.txt:1: unknown limit `rmp` (did you mean `rpm`?)".into(),
        ),
        (
            11,
            "backends[0].weight",
            "expected a number, found the text \"heavy\"".into(),
        ),
        (
            14,
            "routing.polcy",
            "unknown key `polcy` (did you mean `policy`?)".into(),
        ),
        (16, "timeouts.connect", "must be above zero".into()),
    ] {
        let line_of = out
            .lines()
            .find(|l| l.contains(&format!("`{key}`")))
            .unwrap_or_else(|| panic!("`{key}` not named:\n{out}"));
        assert!(
            line_of.starts_with(&at(line)),
            "{key} at line {line}: {line_of}"
        );
        assert!(line_of.contains(&says), "{key}: {says}: {line_of}");
    }
    assert!(
        out.contains("error: 6 mistakes in the configuration"),
        "{out}"
    );

    // Legal but probably not meant: said, and the file passes.
    std::fs::write(
        &p,
        "backends:\n  - url: http://127.0.0.1\n  - url: http://no-such-host.invalid:8000\n",
    )
    .unwrap();
    let (ok, out) = check(&p);
    assert!(ok, "{out}");
    assert!(
        out.contains("warning: ") && out.contains("names no port, so port 80 is used"),
        "{out}"
    );
    assert!(
        out.contains("`backends[1].url`") && out.contains("adds it when the name resolves"),
        "{out}"
    );
    assert!(
        out.contains(
            "ok (1 listener, 2 backends, 1 of them waiting for their host name to resolve"
        ),
        "{out}"
    );
}

#[test]
fn text_that_is_not_yaml_is_located_and_explained() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.yaml");
    for (text, line, says) in [
        ("backends:\n\t- url: http://127.0.0.1:8000\n", 2, "a tab character"),
        (
            "backends:\n  - url: http://127.0.0.1:8000\n   models: [m]\n",
            3,
            "indented differently from the list items above it",
        ),
        (
            "backends:\n  - url: http://127.0.0.1:8000\nrouting:\n  policy: vllm\nrouting:\n  policy: round-robin\n",
            5,
            "`routing` is given twice (first on line 3)",
        ),
    ] {
        std::fs::write(&p, text).unwrap();
        let (ok, out) = check(&p);
        assert!(!ok, "{out}");
        assert!(
            out.starts_with(&format!("error: {}:{line}:", p.display())) && out.contains(says),
            "{text:?}: {out}"
        );
        assert!(!out.contains('?') || out.contains("did you mean"), "{out}");
    }
}
