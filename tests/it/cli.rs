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
        out.contains("`routing.polcy`: unknown field `polcy`, expected `policy`"),
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
