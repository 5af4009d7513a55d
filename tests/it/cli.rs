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
        out.contains("`routing.polcy`: unknown field `polcy`, expected one of `policy`"),
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
    assert!(ok && out.contains("2 listener(s)"), "{out}");
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
