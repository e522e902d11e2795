//! `ring-report`: the ring's balance, key movement and lookup cost as JSON
//! (`ringcache_tests::bench::ring`), for `cargo xtask bench --suite ring`.

use clap::Parser;
use ringcache_tests::bench::ring::report;

#[derive(Parser)]
#[command(
    name = "ring-report",
    about = "Balance and movement of the consistent-hash ring, as JSON"
)]
struct Cli {
    /// Node counts to measure (repeat or separate with commas).
    #[arg(long, value_delimiter = ',', default_values_t = [3, 10, 100])]
    nodes: Vec<usize>,
    /// Keys placed (`key-0` ...).
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        cli.nodes.iter().all(|&n| n >= 2),
        "every node count must be at least 2 (one is removed)"
    );
    let report = report(&cli.nodes, cli.keys);
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
