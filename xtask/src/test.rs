//! `cargo xtask test`: the whole test suite against real services.

use std::{
    ffi::OsString,
    process::{Command, ExitCode, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use crate::{paths, process::ChildGuard, services::Services};

/// How many log lines of each service to show after a failure.
const LOG_TAIL_LINES: usize = 40;

/// How long cargo and the tests get to exit after an interrupt before their
/// whole process group is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Passed on to `cargo test --workspace`, e.g. `-- -p ringcache-tests
    /// --test infra` or `-- --nocapture`.
    #[arg(last = true)]
    cargo_test_args: Vec<OsString>,
}

/// Provisions the services, builds the binaries, runs the tests, tears down.
pub async fn run(args: Args, cancel: &CancellationToken) -> Result<ExitCode> {
    let logs_dir = paths::new_logs_dir("test")?;
    eprintln!("xtask: service logs go to {}", logs_dir.display());

    // Tools the tests run as real clients: redis-cli (the RESP listener)
    // and kubectl (renders deploy/k8s with its built-in kustomize).
    crate::services::debian::ensure_installed("redis-cli", "redis-tools", false, cancel).await?;
    crate::services::debian::ensure_installed("kubectl", "kubernetes-client", false, cancel)
        .await?;
    let services = Services::start(&logs_dir, cancel).await?;
    for (name, value) in services.env() {
        eprintln!("xtask: {name}={value}");
    }

    let outcome = build_and_test(&args, &services, cancel).await;
    let failed = !matches!(outcome, Ok(Outcome::Passed));
    if failed && !cancel.is_cancelled() {
        services.print_log_tails(LOG_TAIL_LINES);
    }
    // Explicit, so that the last line is printed after the teardown that
    // copies the PostgreSQL log out of its temporary directory.
    drop(services);
    eprintln!(
        "xtask: services stopped; logs kept in {} (postgres.log, tansu.log)",
        logs_dir.display()
    );
    let tally = TALLY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(tally) = tally {
        // One summary over every test binary, in the plain form CI reads.
        println!(
            "\ntests: {} passed, {} failed, {} skipped",
            tally.passed, tally.failed, tally.ignored
        );
    }

    match outcome? {
        Outcome::Passed => Ok(ExitCode::SUCCESS),
        Outcome::Failed(step, status) => bail!("{step} failed ({status})"),
        Outcome::Interrupted => Ok(ExitCode::from(crate::INTERRUPTED)),
    }
}

enum Outcome {
    Passed,
    Failed(&'static str, ExitStatus),
    Interrupted,
}

async fn build_and_test(
    args: &Args,
    services: &Services,
    cancel: &CancellationToken,
) -> Result<Outcome> {
    // Process-level tests spawn `target/debug/<bin>` and
    // `target/debug/examples/<example>`, which `cargo test` alone does not
    // build for another crate's tests.
    let mut build = paths::cargo();
    build.args(["build", "--workspace", "--bins", "--examples"]);
    match run_cargo("cargo build", &mut build, cancel).await? {
        Outcome::Passed => {}
        other => return Ok(other),
    }

    // The full suite also runs the demo's walkthrough, which checks what it
    // narrates, so that the README's first command cannot rot. It runs
    // before `cargo test` so that the test summary stays the last output.
    if args.cargo_test_args.is_empty() {
        eprintln!("xtask: running `cargo xtask demo --no-wait`");
        let dir = paths::new_logs_dir("demo")?;
        crate::demo::run_with(crate::demo::Args { no_wait: true }, services, &dir, cancel)
            .await
            .context("`cargo xtask demo --no-wait` failed")?;
        if cancel.is_cancelled() {
            return Ok(Outcome::Interrupted);
        }
    }

    let mut test = paths::cargo();
    test.arg("test");
    // `--workspace` would override a package selection passed through.
    if !selects_packages(&args.cargo_test_args) {
        test.arg("--workspace");
    }
    test.args(&args.cargo_test_args)
        .envs(services.env())
        .stdout(Stdio::piped());
    run_cargo("cargo test", &mut test, cancel).await
}

/// The tally of the `cargo test` run, printed as the very last line, after
/// the teardown messages.
static TALLY: std::sync::Mutex<Option<Tally>> = std::sync::Mutex::new(None);

/// Test counts summed over every `test result:` line of `cargo test`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    /// Adds the counts of one `test result: ok. 3 passed; 0 failed; ...`
    /// line; other lines are ignored.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

/// Copies the child's stdout to ours line by line while tallying the test
/// results, so that the run can end with one summary line over all test
/// binaries (the last `test result:` line of `cargo test` only covers the
/// last binary, often a doc-test run with no tests).
fn forward_and_tally(stdout: std::process::ChildStdout) -> Tally {
    use std::io::{BufRead, Write};
    let mut tally = Tally::default();
    let out = std::io::stdout();
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        tally.add_line(&line);
        let mut out = out.lock();
        // A closed stdout must not stop the tests: ignore write errors.
        let _ = writeln!(out, "{line}");
    }
    tally
}

/// Whether pass-through arguments choose packages themselves (`-p NAME`,
/// `-pNAME`, `--package[=NAME]`), before any `--` that starts the test
/// binaries' own arguments.
fn selects_packages(args: &[OsString]) -> bool {
    args.iter()
        .map(|arg| arg.to_string_lossy())
        .take_while(|arg| arg != "--")
        .any(|arg| arg.starts_with("-p") || arg == "--package" || arg.starts_with("--package="))
}

/// Runs a cargo command with inherited output, in its own process group so
/// that on interrupt the command and everything under it (test binaries and
/// the processes they spawned) are stopped and then, at the latest when the
/// guard drops, killed.
async fn run_cargo(
    step: &'static str,
    command: &mut Command,
    cancel: &CancellationToken,
) -> Result<Outcome> {
    command.current_dir(paths::workspace_root());
    let mut child = ChildGuard::spawn(step, command, None)?;
    let tally = child
        .take_stdout()
        .map(|stdout| std::thread::spawn(move || forward_and_tally(stdout)));
    tokio::select! {
        status = child.wait() => {
            let status = status.with_context(|| format!("failed to wait for {step}"))?;
            if let Some(reader) = tally {
                // The reader ends at EOF, which comes when the child exits.
                let tally = reader.join().map_err(|_| anyhow::anyhow!("the output reader panicked"))?;
                *TALLY.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tally);
            }
            Ok(if status.success() { Outcome::Passed } else { Outcome::Failed(step, status) })
        }
        _ = cancel.cancelled() => {
            // SIGINT first, as a terminal would send it, so that test
            // harnesses and guards get their chance to clean up.
            child.stop(Signal::SIGINT, INTERRUPT_GRACE).await?;
            Ok(Outcome::Interrupted)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Tally, selects_packages};

    #[test]
    fn tally_sums_test_result_lines_only() {
        let mut tally = Tally::default();
        for line in [
            "running 3 tests",
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "test foo ... ok",
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s",
        ] {
            tally.add_line(line);
        }
        assert_eq!(
            tally,
            Tally {
                passed: 5,
                failed: 1,
                ignored: 1
            }
        );
    }

    fn args(list: &[&str]) -> Vec<std::ffi::OsString> {
        list.iter().map(Into::into).collect()
    }

    #[test]
    fn package_selection_is_detected_before_the_test_binary_separator() {
        assert!(selects_packages(&args(&["-p", "ringcache-tests"])));
        assert!(selects_packages(&args(&["-pringcache-tests"])));
        assert!(selects_packages(&args(&[
            "--package=xtask",
            "--test",
            "infra"
        ])));
        assert!(!selects_packages(&args(&["--test", "infra"])));
        assert!(!selects_packages(&args(&["--", "-p"])));
        assert!(!selects_packages(&args(&[])));
    }
}
