use super::agent::{check_image, deployed_agent};
use super::twin::check_twin_key;
use super::*;
use serde_json::json;

#[test]
fn edge_est_is_recognised_by_image_or_name() {
    assert!(is_edge_est(
        "x",
        Some("myacr.azurecr.io/edge-est:0.1.0-amd64")
    ));
    assert!(is_edge_est("x", Some("$upstream:443/edge-est:0.1.0-amd64")));
    assert!(is_edge_est("x", Some("${MODULES.edge-est}")));
    assert!(is_edge_est("x", Some("${MODULES.edge-est.arm64v8}")));
    assert!(is_edge_est("x", Some("reg:5000/edge-est@sha256:abcd")));
    assert!(is_edge_est("estproxy", Some("myacr.azurecr.io/other:1")));
    assert!(!is_edge_est("x", Some("myacr.azurecr.io/edge-est-tools:1")));
    assert!(!is_edge_est("x", Some("${MODULES.edge-estimator}")));
    assert!(!is_edge_est("x", None));
}

#[test]
fn images_follow_edge_agents_rules() {
    for ok in [
        "mcr.microsoft.com/azureiotedge-hub:1.5",
        "$upstream:443/azureiotedge-agent:1.5",
        "registry:latest",
        "localhost:5000/edge-est",
        "${MODULES.edge-est}",
    ] {
        assert!(check_image(ok).is_ok(), "{ok}: {:?}", check_image(ok));
    }
    for bad in [
        "$upstream/edge-est:1",
        "$registry:443/edge-est:1",
        "myacr.azurecr.io/Edge-Est:1",
        "edge-est:",
    ] {
        assert!(check_image(bad).is_err(), "{bad}");
    }
}

#[test]
fn deployed_form_chunks_long_create_options() {
    let agent = json!({"modules": {"m": {"settings": {"createOptions": {"Env": ["A=".to_owned() + &"x".repeat(1200)]}}}}});
    let deployed = deployed_agent(agent.as_object().unwrap());
    let settings = &deployed["modules"]["m"]["settings"];
    assert_eq!(settings["createOptions"].as_str().unwrap().len(), 512);
    assert_eq!(settings["createOptions01"].as_str().unwrap().len(), 512);
    assert!(settings["createOptions02"].as_str().unwrap().len() < 512);
}

#[test]
fn twin_keys_and_sockets() {
    assert!(check_twin_key("labels").is_ok());
    assert!(check_twin_key("a.b").is_err());
    assert!(check_twin_key("$version").is_err());
    assert_eq!(
        unix_sockets("proxy_pass http://unix:/var/run/edge-est/proxy.sock:;"),
        vec!["/var/run/edge-est/proxy.sock".to_owned()]
    );
}
