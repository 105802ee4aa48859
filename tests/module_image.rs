//! The module's image recipe: one version (Cargo.toml's, which `module/build-image.sh` writes
//! into module.json), a Dockerfile and a build context of its own per platform, and the
//! scripts' refusals. Building and running the images takes Docker and minutes:
//! `module/build-image.sh --platform all`, `module/test-image.sh --platform all` and
//! `module/arm64-demo.sh` do it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("module")
}

#[test]
fn module_json_has_cargo_toml_version_and_a_dockerfile_per_platform() {
    let text = std::fs::read_to_string(module_dir().join("module.json")).unwrap();
    let module: Value = serde_json::from_str(&text).unwrap();
    let image = &module["image"];
    assert_eq!(
        image["tag"]["version"],
        env!("CARGO_PKG_VERSION"),
        "module.json's tag version must be Cargo.toml's (module/build-image.sh writes it)"
    );
    assert_eq!(image["repository"], "${CONTAINER_REGISTRY_SERVER}/edge-est");
    assert_eq!(image["contextPath"], "./");
    let platforms = image["tag"]["platforms"].as_object().unwrap();
    let mut keys: Vec<&str> = platforms.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["amd64", "arm64v8"]);
    for (platform, dockerfile) in platforms {
        let path = module_dir().join(dockerfile.as_str().unwrap());
        let recipe = std::fs::read_to_string(&path).unwrap();
        // Its own context: one platform's build never takes the other's binary.
        assert!(
            recipe.contains(&format!("COPY --chown=10001:10001 rootfs-{platform}/ /")),
            "{}",
            path.display()
        );
        assert!(recipe.contains("FROM scratch"));
        assert!(recipe.contains("USER 10001:10001"));
        for other in platforms.keys().filter(|p| *p != platform) {
            assert!(
                !recipe.contains(&format!("rootfs-{other}")),
                "{}",
                path.display()
            );
        }
    }
    // The contexts are build output.
    let ignore =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.gitignore")).unwrap();
    assert!(ignore.lines().any(|l| l == "/module/rootfs-*/"));
}

#[test]
fn the_scripts_refuse_what_they_cannot_build() {
    let run = |script: &str, args: &[&str]| {
        Command::new("bash")
            .arg(module_dir().join(script))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(
        "build-image.sh",
        &["--platform", "arm32v7", "--context-only"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported platform arm32v7"));
    // IMAGE names one image only.
    let out2 = Command::new("bash")
        .arg(module_dir().join("build-image.sh"))
        .args(["--platform", "all"])
        .env("IMAGE", "x:1")
        .output()
        .unwrap();
    assert_eq!(out2.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out2.stderr).contains("IMAGE names one image"));
    let out = run("build-image.sh", &["--frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    // A source tree elsewhere: the script says where it looked.
    let out = Command::new("bash")
        .arg(module_dir().join("build-image.sh"))
        .arg("--context-only")
        .env("EDGE_EST_SOURCE", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no Cargo.toml in /nonexistent"));
    // iotedgedev's layout: the module folder linked into a solution as modules/edge-est; the
    // script still finds the sources (and gets as far as the platform).
    let solution = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(solution.path().join("modules")).unwrap();
    std::os::unix::fs::symlink(module_dir(), solution.path().join("modules/edge-est")).unwrap();
    let out = Command::new("bash")
        .arg("modules/edge-est/build-image.sh")
        .args(["--platform", "arm32v7", "--context-only"])
        .current_dir(solution.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unsupported platform arm32v7"), "{stderr}");
}
