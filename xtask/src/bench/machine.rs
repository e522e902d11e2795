//! The `machine` region: what the figures were measured on.

use std::{fmt::Write as _, process::Command};

use anyhow::Result;

use super::Ctx;
use crate::paths;

/// A markdown description of this machine, the versions of everything
/// measured, the commit and the date.
pub async fn describe(ctx: &Ctx) -> Result<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
        .map_or("unknown", |(_, m)| m.trim())
        .to_owned();
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        .map_or_else(
            || "unknown".to_owned(),
            |kib| format!("{:.0} GiB", kib / 1024.0 / 1024.0),
        );
    let (server_cpu, load_cpu) = ctx.cpus();
    let mut out = String::new();
    let root = paths::workspace_root();
    let commit = output(
        "git",
        &[
            "-C",
            &root.display().to_string(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let dirty = output(
        "git",
        &["-C", &root.display().to_string(), "status", "--porcelain"],
    );
    let date = output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    writeln!(
        out,
        "Measured by `cargo xtask bench` on {date}, at commit `{commit}`{}.",
        if dirty.is_empty() {
            ""
        } else {
            " (with uncommitted changes)"
        }
    )?;
    writeln!(out)?;
    writeln!(out, "| | |")?;
    writeln!(out, "|---|---|")?;
    writeln!(
        out,
        "| CPU | {model}, {cpus} CPUs (servers pinned to CPU {server_cpu}, load generators to CPU {load_cpu}) |"
    )?;
    writeln!(out, "| memory | {mem_gib} |")?;
    writeln!(out, "| kernel | {} |", output("uname", &["-sr"]))?;
    writeln!(out, "| rustc | {} |", output("rustc", &["-V"]))?;
    writeln!(
        out,
        "| redis-server | {} |",
        output("redis-server", &["--version"])
    )?;
    writeln!(
        out,
        "| redis-benchmark | {} |",
        output("redis-benchmark", &["--version"])
    )?;
    writeln!(
        out,
        "| builds | `cargo build --release` (ringcache); Debian's packages (redis) |"
    )?;
    Ok(out)
}

/// The trimmed stdout of a command, or `unknown`.
pub fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}
