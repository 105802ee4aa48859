//! The PKCS#11 variant of the module image (`module/build-pkcs11-image.sh`,
//! `module/Dockerfile.pkcs11`): what it lays out for a PKCS#11 library to load, and its
//! refusals. Building and running the image takes Docker: `module/test-pkcs11-image.sh` does it
//! (README, "Keys in a PKCS#11 token").

use std::path::{Path, PathBuf};
use std::process::Command;

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("module/build-pkcs11-image.sh")
}

#[test]
fn the_dockerfile_is_from_scratch_non_root_with_its_own_context() {
    let recipe = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("module/Dockerfile.pkcs11"),
    )
    .unwrap();
    assert!(recipe.contains("FROM scratch"));
    assert!(recipe.contains("COPY --chown=10001:10001 rootfs-pkcs11/ /"));
    assert!(recipe.contains("USER 10001:10001"));
}

#[test]
fn the_context_holds_the_loader_the_libraries_and_the_module() {
    assert!(
        Path::new(SOFTHSM).exists(),
        "{SOFTHSM} missing: install Debian's softhsm2 (.ci/run does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("rootfs");
    let out = Command::new("bash")
        .arg(script())
        .args(["--context-only", "--binary", env!("CARGO_BIN_EXE_edge-est")])
        .args(["--with", SOFTHSM])
        .env("CONTEXT_DIR", &context)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The program interpreter the binary names, and what ldd says it and the module load.
    let interp = Command::new("readelf")
        .args(["-lW", env!("CARGO_BIN_EXE_edge-est")])
        .output()
        .unwrap();
    let interp = String::from_utf8_lossy(&interp.stdout);
    let loader = interp
        .split("Requesting program interpreter: ")
        .nth(1)
        .and_then(|r| r.split(']').next())
        .expect("a dynamically linked binary");
    let mut wanted = vec![
        loader.to_owned(),
        SOFTHSM.to_owned(),
        "/edge-est".to_owned(),
    ];
    for file in [env!("CARGO_BIN_EXE_edge-est"), SOFTHSM] {
        let ldd = Command::new("ldd").arg(file).output().unwrap();
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            if let Some((_, path)) = line.split_once("=> /") {
                wanted.push(format!("/{}", path.split(" (").next().unwrap()));
            }
        }
    }
    assert!(wanted.iter().any(|w| w.contains("libcrypto")), "{wanted:?}");
    for file in &wanted {
        let there = context.join(file.trim_start_matches('/'));
        assert!(there.is_file(), "{file} is not in the context");
    }
    assert!(context.join("data").is_dir() && context.join("tmp").is_dir());
}

#[test]
fn the_script_refuses_what_it_cannot_build() {
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let out = Command::new("bash")
            .arg(script())
            .args(args)
            .envs(envs.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("name the PKCS#11 module with --with"), "{err}");
    let (code, err) = run(&["--with", SOFTHSM], &[("CONTEXT_DIR", "/tmp/x")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("CONTEXT_DIR goes with --context-only"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("rootfs").display().to_string();
    let (code, err) = run(
        &[
            "--context-only",
            "--binary",
            env!("CARGO_BIN_EXE_edge-est"),
            "--with",
            "/nonexistent/libpkcs11.so",
        ],
        &[("CONTEXT_DIR", &context)],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("/nonexistent/libpkcs11.so: no such file"),
        "{err}"
    );
}
