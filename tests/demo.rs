//! `edge-est demo` runs a three-layer hierarchy and a child through it, and exits 0.

mod common;

#[test]
fn demo_enrolls_through_three_layers_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-est"))
        .args(["demo", "--dir"])
        .arg(dir.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let text = common::stdout(&out);
    assert!(out.status.success(), "{text}{}", common::stderr(&out));
    for step in [
        "1. device identity",
        "2. Edge CA",
        "3. renewal",
        "demo passed",
    ] {
        assert!(text.contains(step), "{step} missing from:\n{text}");
    }
    assert_eq!(text.matches("verif").count(), 3, "{text}");
    // The PKI and journals are left for inspection.
    let top = std::fs::read_to_string(dir.path().join("journal-top.jsonl")).unwrap();
    assert_eq!(top.lines().count(), 3);
}
