//! The example configurations in `deployment/` load and validate against a PKI with the file
//! names they use (the demo's).

use std::path::Path;

use edge_est::config::Config;
use edge_est::runtime::Runtime;

#[test]
fn layered_examples_validate() {
    let dir = tempfile::tempdir().unwrap();
    edge_est::demo::write_pki(dir.path()).unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("deployment/layered");
    let mut checked = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let config =
                Config::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Err(e) = Runtime::build(&config, dir.path()) {
                panic!("{} does not validate: {e}", path.display());
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 3);
}

#[test]
fn a_broken_example_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    edge_est::demo::write_pki(dir.path()).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deployment/layered/middle.toml");
    let mut config = Config::from_file(&path).unwrap();
    config.labels[0].upstream = Some("nowhere".into());
    let error = Runtime::build(&config, dir.path())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.contains("labels[0].upstream") && error.contains("nowhere"),
        "{error}"
    );
}
