//! `redis-cli`, which the node's RESP tests run as a real client.

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;

use crate::paths;

/// Makes sure `redis-cli` is on `PATH`: when it is missing and we are root,
/// installs Debian's `redis-tools` with apt-get (refreshing the package
/// lists first if the install alone fails). Otherwise says what to install;
/// the RESP test then fails with the same advice.
pub async fn ensure_installed(cancel: &CancellationToken) -> Result<()> {
    if paths::find_on_path("redis-cli").is_some() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "xtask: redis-cli is not installed and we are not root; \
             install Debian's redis-tools, or the RESP test will fail"
        );
        return Ok(());
    }
    eprintln!("xtask: redis-cli is not installed; running `apt-get install -y redis-tools`");
    if apt_get(&["install", "-y", "redis-tools"], cancel)
        .await
        .is_err()
    {
        apt_get(&["update"], cancel).await?;
        apt_get(&["install", "-y", "redis-tools"], cancel).await?;
    }
    if paths::find_on_path("redis-cli").is_none() {
        bail!("redis-tools installed but redis-cli is still not on PATH");
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
