//! Tools that come from Debian packages (`redis-cli`, `redis-server`,
//! `redis-benchmark`), installed on demand.

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;

use crate::paths;

/// Makes sure `binary` is on `PATH`: when it is missing and we are root,
/// installs the Debian `package` that ships it with apt-get (refreshing the
/// package lists first if the install alone fails).
///
/// When we are not root, `required` decides: an error saying what to
/// install, or a warning (the caller's tests then fail with the same
/// advice).
pub async fn ensure_installed(
    binary: &str,
    package: &str,
    required: bool,
    cancel: &CancellationToken,
) -> Result<()> {
    if paths::find_on_path(binary).is_some() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        if required {
            bail!("{binary} is not installed and we are not root; install Debian's {package}");
        }
        eprintln!(
            "xtask: {binary} is not installed and we are not root; \
             install Debian's {package}, or the tests that run it will fail"
        );
        return Ok(());
    }
    eprintln!("xtask: {binary} is not installed; running `apt-get install -y {package}`");
    if apt_get(&["install", "-y", package], cancel).await.is_err() {
        apt_get(&["update"], cancel).await?;
        apt_get(&["install", "-y", package], cancel).await?;
    }
    if paths::find_on_path(binary).is_none() {
        bail!("{package} installed but {binary} is still not on PATH");
    }
    Ok(())
}

async fn apt_get(args: &[&str], cancel: &CancellationToken) -> Result<()> {
    let mut child = tokio::process::Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .kill_on_drop(true)
        .spawn()
        .context("failed to run apt-get")?;
    let status = tokio::select! {
        status = child.wait() => status.context("failed to wait for apt-get")?,
        _ = cancel.cancelled() => bail!("interrupted while running apt-get"),
    };
    if !status.success() {
        bail!("`apt-get {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
