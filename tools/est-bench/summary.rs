//! `est-bench summary`: the results of `bench/run.sh` (JSON files in one directory) printed
//! next to the crypto floor, each checked against the targets of issue 7.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

use crate::floor::FloorReport;
use crate::load::LoadReport;

#[derive(Args, Debug)]
pub struct SummaryArgs {
    /// Directory holding floor.json and the runs' JSON files (see bench/run.sh).
    #[arg(long)]
    pub dir: PathBuf,
}

#[derive(Deserialize)]
struct IdleRss {
    rss_kib: u64,
}

fn read<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> anyhow::Result<Option<T>> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("parsing {}", path.display()))
}

fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "NOT MET"
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn errors(r: &LoadReport) -> String {
    if r.failed == 0 {
        "0".to_owned()
    } else {
        format!("{} of {}", r.failed, r.completed)
    }
}

pub fn run(args: &SummaryArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    let floor: FloorReport = read(dir, "floor.json")?.context("floor.json is missing")?;
    println!();
    println!("== edge-est benchmark summary ==");
    println!(
        "crypto floor, server side, one core ({}; {}; load average {:.1}):",
        floor.cpu_model,
        floor.tls,
        floor.load_average.unwrap_or(f64::NAN)
    );
    println!(
        "  all P-256: handshake {:.0} + CSR {:.0} + sign {:.0} = {:.0} µs -> {:.0} enrollments/s per core",
        floor.handshake_server_us,
        floor.csr_verify_us,
        floor.sign_p256_us,
        floor.floor_p256_us,
        floor.floor_p256_per_s
    );
    println!(
        "  RSA-2048 issuer: handshake {:.0} + CSR {:.0} + sign {:.0} = {:.0} µs -> {:.0} enrollments/s per core",
        floor.handshake_server_rsa_ca_us,
        floor.csr_verify_us,
        floor.sign_rsa2048_us,
        floor.floor_rsa2048_us,
        floor.floor_rsa2048_per_s
    );
    println!(
        "  (both sides of the handshake, as the field notes count: {:.0} µs -> {:.0}/s)",
        floor.floor_p256_both_sides_us, floor.floor_p256_both_sides_per_s
    );
    println!();
    println!(
        "{:<46} {:>9} {:>8} {:>8} {:>10} {:>9} {:>7} {:>5}  {:<8} target",
        "scenario",
        "units/s",
        "p50 ms",
        "p99 ms",
        "srv µs/u",
        "u/s/core",
        "/floor",
        "load",
        "errors"
    );
    let row = |title: &str, r: &LoadReport, floor_per_s: Option<f64>, target: &str| {
        let ratio = match (floor_per_s, r.units_per_core_s) {
            (Some(f), Some(u)) => format!("{:.2}", u / f),
            _ => "-".to_owned(),
        };
        println!(
            "{:<46} {:>9.0} {:>8.2} {:>8.2} {:>10.0} {:>9.0} {:>7} {:>5.1}  {:<8} {}",
            title,
            r.rate,
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.server_cpu_us_per_unit.unwrap_or(f64::NAN),
            r.units_per_core_s.unwrap_or(f64::NAN),
            ratio,
            r.load_average.unwrap_or(f64::NAN),
            errors(r),
            target
        );
    };
    let ratio_of = |r: &LoadReport, per_s: f64| r.units_per_core_s.unwrap_or(0.0) / per_s;

    let mut verdicts: Vec<String> = Vec::new();
    if let Some(r) = read::<LoadReport>(dir, "sign-p256.json")? {
        let ratio = ratio_of(&r, floor.floor_p256_per_s);
        let met = ratio >= 0.5 && r.failed == 0;
        row(
            &format!("local-sign P-256, fresh mTLS, c={}", r.concurrency),
            &r,
            Some(floor.floor_p256_per_s),
            &format!(">= 0.50 of floor: {}", verdict(met)),
        );
        verdicts.push(format!(
            "local-sign P-256 fresh mTLS >= 50 % of the floor per core of server CPU: {} ({:.0} %)",
            verdict(met),
            ratio * 100.0
        ));
    }
    if let Some(r) = read::<LoadReport>(dir, "sign-rsa.json")? {
        row(
            &format!(
                "local-sign RSA-2048 issuer, fresh mTLS, c={}",
                r.concurrency
            ),
            &r,
            Some(floor.floor_rsa2048_per_s),
            "(vs the RSA floor)",
        );
    }
    if let Some(r) = read::<LoadReport>(dir, "iot-edge.json")? {
        row(
            &format!("IoT Edge shape (enroll+cacerts), c={}", r.concurrency),
            &r,
            Some(floor.floor_p256_per_s),
            "(issuances)",
        );
    }
    if let Some(r) = read::<LoadReport>(dir, "cacerts.json")? {
        let met = r.rate >= 20_000.0 && r.failed == 0;
        row(
            &format!("cacerts keep-alive, c={}", r.concurrency),
            &r,
            None,
            &format!(">= 20000/s: {}", verdict(met)),
        );
        verdicts.push(format!(
            "cacerts keep-alive >= 20,000 requests/s: {} ({:.0}/s)",
            verdict(met),
            r.rate
        ));
    }
    if let Some(r) = read::<LoadReport>(dir, "rss.json")? {
        row(
            &format!("100k enrollments, keep-alive mTLS, c={}", r.concurrency),
            &r,
            Some(floor.floor_p256_per_s),
            "(no handshake per request)",
        );
    }

    let forward: Vec<Option<LoadReport>> = (0..3)
        .map(|n| read::<LoadReport>(dir, &format!("forward-{n}.json")))
        .collect::<anyhow::Result<_>>()?;
    let forward_tput: Vec<Option<LoadReport>> = (0..3)
        .map(|n| read::<LoadReport>(dir, &format!("forward-tput-{n}.json")))
        .collect::<anyhow::Result<_>>()?;
    if forward.iter().all(Option::is_none) {
        println!("{:<46} forward: not supported by this build", "forwarding");
    } else {
        let base = forward[0].as_ref().map(|r| r.latency_ms.p50);
        for (n, r) in forward.iter().enumerate() {
            let Some(r) = r else { continue };
            let target = match (n, base) {
                (0, _) => "(baseline: top layer directly)".to_owned(),
                (_, Some(b)) => {
                    let added = (r.latency_ms.p50 - b) / n as f64;
                    let met = added <= 1.0 && r.failed == 0;
                    verdicts.push(format!(
                        "forwarding through {n} layer(s) adds <= 1 ms p50 per layer: {} \
                         ({added:+.2} ms per layer)",
                        verdict(met)
                    ));
                    format!("{added:+.2} ms/layer p50 <= 1: {}", verdict(met))
                }
                _ => "-".to_owned(),
            };
            row(
                &format!("forward {n} layer(s), fresh mTLS, c={}", r.concurrency),
                r,
                Some(floor.floor_p256_per_s),
                &target,
            );
        }
        for (n, r) in forward_tput.iter().enumerate() {
            let Some(r) = r else { continue };
            row(
                &format!("forward {n} layer(s), fresh mTLS, c={}", r.concurrency),
                r,
                Some(floor.floor_p256_per_s),
                "(all layers' CPU)",
            );
        }
    }

    println!();
    let idle = read::<IdleRss>(dir, "idle-rss.json")?;
    if let Some(idle) = &idle {
        let met = idle.rss_kib <= 15 * 1024;
        println!(
            "idle RSS of a fresh server: {:.1} MiB (target <= 15 MiB: {})",
            mib(idle.rss_kib),
            verdict(met)
        );
        verdicts.push(format!(
            "idle RSS <= 15 MiB: {} ({:.1} MiB)",
            verdict(met),
            mib(idle.rss_kib)
        ));
    }
    if let Some(r) = read::<LoadReport>(dir, "rss.json")? {
        if let Some(server) = r.servers.first() {
            let samples = &server.rss_samples;
            let text: Vec<String> = samples
                .iter()
                .map(|(n, kib)| format!("{}k: {:.1}", n / 1000, mib(*kib)))
                .collect();
            println!(
                "RSS over {} enrollments (MiB at completed count): before {:.1}; {}; VmHWM {:.1}",
                r.completed,
                mib(server.memory_before.rss_kib),
                text.join(", "),
                mib(server.memory_after.hwm_kib)
            );
            if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
                let grown = last.1 as f64 - first.1 as f64;
                let per = grown * 1024.0 / (last.0.saturating_sub(first.0)).max(1) as f64;
                let met = grown <= 1024.0 && r.failed == 0;
                println!(
                    "  growth from {}k to {}k: {:+.1} MiB = {:+.1} bytes per enrollment \
                     (target: none, i.e. <= 1 MiB of allocator noise: {})",
                    first.0 / 1000,
                    last.0 / 1000,
                    grown / 1024.0,
                    per,
                    verdict(met)
                );
                verdicts.push(format!(
                    "no RSS growth over {} enrollments: {} ({:+.1} MiB from {}k to {}k)",
                    r.completed,
                    verdict(met),
                    grown / 1024.0,
                    first.0 / 1000,
                    last.0 / 1000
                ));
            }
        }
    }
    println!();
    println!("targets of issue 7:");
    for v in verdicts {
        println!("  - {v}");
    }
    Ok(())
}
