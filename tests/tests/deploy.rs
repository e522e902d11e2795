//! The deployment files (`deploy/`) and the configuration reference
//! (`docs/configuration.md`), checked against the code.
//!
//! No container engine runs here, so the checks are what can be made
//! without one: every file parses; every config file the containers mount
//! loads through the binaries' own `Config::load`, with the flags and
//! environment variables the containers set (each of which must be one the
//! binary's `--help` lists); the member lists, ports, probes, seeds and
//! scrape targets agree with each other; the Kubernetes manifests render
//! with `kubectl kustomize`; the dashboard and the alert rules use only
//! metrics the code exports (the node's scraped from a running node); and
//! the configuration reference lists exactly the settings, flags and
//! environment variables the code has.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use cache_client::{Client, ClientConfig, SetOptions};
use clap::Parser;
use ringcache_tests::{NODE_HEALTH_SERVICE, NodeConfig, NodeProcess, node_binary, worker_binary};
use serde::Deserialize;
use serde_norway::Value as Yaml;

/// Where the containers see their config files (compose volumes and the
/// Kubernetes ConfigMap mount).
const CONTAINER_CONFIG_DIR: &str = "/etc/ringcache";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace root")
        .to_owned()
}

fn read(rel: &str) -> Result<String> {
    std::fs::read_to_string(root().join(rel)).with_context(|| format!("cannot read {rel}"))
}

/// Every YAML document of a text (Kubernetes manifests hold several).
fn yaml_docs(text: &str) -> Result<Vec<Yaml>> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| {
            let mut value = Yaml::deserialize(doc)?;
            value.apply_merge()?;
            Ok(value)
        })
        .collect()
}

fn yaml(rel: &str) -> Result<Yaml> {
    let mut docs = yaml_docs(&read(rel)?).with_context(|| format!("{rel} does not parse"))?;
    ensure!(
        docs.len() == 1,
        "{rel} has {} documents, not one",
        docs.len()
    );
    Ok(docs.remove(0))
}

fn str_of<'a>(value: &'a Yaml, what: &str) -> Result<&'a str> {
    value
        .as_str()
        .with_context(|| format!("{what} is not a string: {value:?}"))
}

fn seq_of<'a>(value: &'a Yaml, what: &str) -> Result<&'a Vec<Yaml>> {
    value
        .as_sequence()
        .with_context(|| format!("{what} is not a list: {value:?}"))
}

fn strings(value: &Yaml, what: &str) -> Result<Vec<String>> {
    seq_of(value, what)?
        .iter()
        .map(|v| str_of(v, what).map(str::to_owned))
        .collect()
}

// ---------------------------------------------------------------------------
// The binaries' command lines, from their `--help`.

/// One option of a binary's `--help`.
#[derive(Clone, Debug)]
struct HelpOption {
    env: Option<String>,
    takes_value: bool,
}

/// What a binary's `--help` lists.
#[derive(Debug)]
struct Help {
    binary: String,
    /// `--flag` → its option (without `--help` and `--version`).
    options: BTreeMap<String, HelpOption>,
    /// Subcommands (without `help`).
    commands: BTreeSet<String>,
}

impl Help {
    fn of(binary: &Path) -> Result<Help> {
        let mut command = Command::new(binary);
        command.arg("--help");
        // A variable that is set shows its value in the help; nothing here
        // needs that.
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("RINGCACHE_")) {
            command.env_remove(name);
        }
        let out = command
            .output()
            .with_context(|| format!("cannot run {} --help", binary.display()))?;
        ensure!(out.status.success(), "{} --help failed", binary.display());
        let text = String::from_utf8(out.stdout)?;
        let mut options = BTreeMap::new();
        let mut commands = BTreeSet::new();
        let mut section = "";
        let mut current: Option<(String, String)> = None;
        let mut flush = |current: &mut Option<(String, String)>| {
            if let Some((flag, block)) = current.take() {
                let env = block.split_once("[env: ").map(|(_, rest)| {
                    rest.chars()
                        .take_while(|c| *c != '=' && *c != ']')
                        .collect::<String>()
                });
                let head = block.lines().next().unwrap_or_default();
                let takes_value = head.contains('<');
                options.insert(flag, HelpOption { env, takes_value });
            }
        };
        for line in text.lines() {
            if !line.starts_with(' ') && line.ends_with(':') {
                flush(&mut current);
                section = line;
                continue;
            }
            let trimmed = line.trim_start();
            match section {
                // `--flag` or `-k, --flag`; a value enum's possible values
                // (`- reject: ...`) continue the block.
                "Options:"
                    if trimmed.starts_with("--") || trimmed.as_bytes().get(2) == Some(&b',') =>
                {
                    flush(&mut current);
                    let flag = trimmed
                        .split([' ', ','])
                        .find(|word| word.starts_with("--"))
                        .with_context(|| format!("option without a long flag: {line:?}"))?;
                    current = Some((flag.to_owned(), format!("{trimmed}\n")));
                }
                "Options:" => {
                    if let Some((_, block)) = &mut current {
                        block.push_str(trimmed);
                        block.push('\n');
                    }
                }
                // Commands sit two columns in; wrapped descriptions deeper.
                "Commands:" if line.starts_with("  ") && !line.starts_with("   ") => {
                    let name = trimmed.split_whitespace().next().unwrap_or_default();
                    if name != "help" {
                        commands.insert(name.to_owned());
                    }
                }
                _ => {}
            }
        }
        flush(&mut current);
        options.remove("--help");
        options.remove("--version");
        ensure!(
            !options.is_empty(),
            "no options in {} --help",
            binary.display()
        );
        Ok(Help {
            binary: binary.display().to_string(),
            options,
            commands,
        })
    }

    fn envs(&self) -> BTreeSet<String> {
        self.options
            .values()
            .filter_map(|o| o.env.clone())
            .collect()
    }

    /// The command-line arguments that say what `env` (a container's
    /// environment) says, for `RINGCACHE_*` variables; each must be one
    /// this binary reads. Other variables (`RUST_LOG`, the pod's own) are
    /// left out.
    fn args_for_env(&self, env: &BTreeMap<String, String>) -> Result<Vec<String>> {
        let mut args = Vec::new();
        for (name, value) in env.iter().filter(|(n, _)| n.starts_with("RINGCACHE_")) {
            let (flag, option) = self
                .options
                .iter()
                .find(|(_, o)| o.env.as_deref() == Some(name))
                .with_context(|| {
                    format!("{name} is not an environment variable of {}", self.binary)
                })?;
            args.push(flag.clone());
            if option.takes_value {
                args.push(value.clone());
            } else {
                ensure!(value == "true", "{name} is a switch; give it as \"true\"");
            }
        }
        Ok(args)
    }

    /// Checks that every `--flag` of `args` is one of this binary's.
    fn check_flags(&self, args: &[String]) -> Result<()> {
        for arg in args.iter().filter(|a| a.starts_with("--")) {
            let flag = arg.split('=').next().unwrap_or(arg);
            ensure!(
                self.options.contains_key(flag),
                "{flag} is not a flag of {}",
                self.binary
            );
        }
        Ok(())
    }
}

fn cachectl_binary() -> Result<PathBuf> {
    let path = node_binary()?.with_file_name("cachectl");
    ensure!(
        path.is_file(),
        "the cachectl binary is not at {}: build it with `cargo build --bins`",
        path.display()
    );
    Ok(path)
}

// ---------------------------------------------------------------------------
// A container's view of its config files, on this machine.

/// A temporary directory standing in for [`CONTAINER_CONFIG_DIR`]: files
/// the container would see there are written here, with that path in their
/// text (and in arguments) replaced by this directory.
struct ConfigDir {
    dir: tempfile::TempDir,
}

impl ConfigDir {
    fn new() -> Result<Self> {
        Ok(ConfigDir {
            dir: tempfile::tempdir()?,
        })
    }

    fn localize(&self, text: &str) -> String {
        text.replace(
            &format!("{CONTAINER_CONFIG_DIR}/"),
            &format!("{}/", self.dir.path().display()),
        )
    }

    /// Places `contents` where the container sees `container_path`.
    fn add(&self, container_path: &str, contents: &str) -> Result<()> {
        let name = container_path
            .strip_prefix(&format!("{CONTAINER_CONFIG_DIR}/"))
            .with_context(|| format!("{container_path} is not under {CONTAINER_CONFIG_DIR}"))?;
        std::fs::write(self.dir.path().join(name), self.localize(contents))?;
        Ok(())
    }
}

/// Loads a node's config as `cache-node` would with `args` and `env`.
fn load_node(
    help: &Help,
    files: &ConfigDir,
    args: &[String],
    env: &BTreeMap<String, String>,
) -> Result<cache_node::config::Config> {
    help.check_flags(args)?;
    let mut argv = vec!["cache-node".to_owned()];
    argv.extend(args.iter().map(|a| files.localize(a)));
    argv.extend(help.args_for_env(env)?);
    let cli = cache_node::config::Cli::try_parse_from(&argv)?;
    cache_node::config::Config::load(&cli).with_context(|| format!("cache-node {argv:?}"))
}

/// Loads a worker's config as `write-back-worker` would with `args` and
/// `env`.
fn load_worker(
    help: &Help,
    files: &ConfigDir,
    args: &[String],
    env: &BTreeMap<String, String>,
) -> Result<write_back_worker::config::Config> {
    help.check_flags(args)?;
    let mut argv = vec!["write-back-worker".to_owned()];
    argv.extend(args.iter().map(|a| files.localize(a)));
    argv.extend(help.args_for_env(env)?);
    let cli = write_back_worker::config::Cli::try_parse_from(&argv)?;
    write_back_worker::config::Config::load(&cli)
        .with_context(|| format!("write-back-worker {argv:?}"))
}

/// The write-back keyspaces a worker config drains.
fn drained(config: &write_back_worker::config::Config) -> Result<BTreeSet<String>> {
    Ok(config
        .drained()?
        .into_iter()
        .map(|(name, _)| name)
        .collect())
}

/// The Dockerfile's stages: name (`FROM … AS name`) → the text of the stage.
fn dockerfile_targets() -> Result<BTreeMap<String, String>> {
    let text = read("deploy/Dockerfile")?;
    let mut stages = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if line.starts_with("FROM ") {
            if let Some((name, body)) = current.take() {
                stages.insert(name, body);
            }
            let name = line
                .split_whitespace()
                .skip_while(|w| !w.eq_ignore_ascii_case("AS"))
                .nth(1)
                .with_context(|| format!("unnamed stage: {line}"))?;
            current = Some((name.to_owned(), String::new()));
        } else if let Some((_, body)) = &mut current {
            body.push_str(line);
            body.push('\n');
        }
    }
    if let Some((name, body)) = current.take() {
        stages.insert(name, body);
    }
    Ok(stages)
}

// ---------------------------------------------------------------------------
// The files parse.

#[test]
fn every_deploy_file_parses() -> Result<()> {
    let mut checked = 0;
    let mut dirs = vec![root().join("deploy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            let name = path.display().to_string();
            match path.extension().and_then(|e| e.to_str()) {
                Some("yml" | "yaml") => {
                    ensure!(!yaml_docs(&text).with_context(|| name.clone())?.is_empty());
                }
                Some("json") => {
                    serde_json::from_str::<serde_json::Value>(&text).context(name)?;
                }
                Some("toml") => {
                    toml::from_str::<toml::Table>(&text).context(name)?;
                }
                _ => continue,
            }
            checked += 1;
        }
    }
    ensure!(checked >= 15, "only {checked} files checked");

    // The example configs are valid configs of their binaries.
    let mut node =
        cache_node::config::Config::from_toml(&read("deploy/config/node.example.toml")?)?;
    node.validate()?;
    let worker: write_back_worker::config::Config =
        toml::from_str(&read("deploy/config/worker.example.toml")?)?;
    worker.validate()?;
    let keyspaces = cache_client::keyspaces::KeyspacesFile::parse(&read(
        "deploy/config/keyspaces.example.toml",
    )?)?;
    keyspaces.settings()?;
    // The Kubernetes copy of the keyspace file is the same file.
    ensure!(
        read("deploy/k8s/config/keyspaces.toml")? == read("deploy/config/keyspaces.example.toml")?,
        "deploy/k8s/config/keyspaces.toml differs from deploy/config/keyspaces.example.toml"
    );
    // The topics script is valid sh.
    let status = Command::new("sh")
        .arg("-n")
        .arg(root().join("deploy/kafka/create-topics.sh"))
        .status()?;
    ensure!(status.success(), "create-topics.sh has a syntax error");
    Ok(())
}

// ---------------------------------------------------------------------------
// docker compose.

/// A compose service's environment (the mapping form).
fn compose_env(service: &Yaml) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    if let Some(map) = service.get("environment").and_then(Yaml::as_mapping) {
        for (k, v) in map {
            let value = match v {
                Yaml::String(s) => s.clone(),
                other => bail!("environment values must be strings: {other:?}"),
            };
            env.insert(str_of(k, "an environment name")?.to_owned(), value);
        }
    }
    Ok(env)
}

/// A compose service's `./file:/container/path[:ro]` volumes, as (repo
/// path, container path); named volumes are left out.
fn compose_binds(service: &Yaml) -> Result<Vec<(String, String)>> {
    let mut binds = Vec::new();
    if let Some(volumes) = service.get("volumes") {
        for volume in strings(volumes, "volumes")? {
            let mut parts = volume.split(':');
            let (Some(source), Some(target)) = (parts.next(), parts.next()) else {
                bail!("volume {volume:?} is not source:target");
            };
            if let Some(rel) = source.strip_prefix("./") {
                let path = format!("deploy/{rel}");
                ensure!(
                    root().join(&path).exists(),
                    "volume source {path} does not exist"
                );
                binds.push((path, target.to_owned()));
            }
        }
    }
    Ok(binds)
}

fn compose_config_dir(service: &Yaml) -> Result<ConfigDir> {
    let files = ConfigDir::new()?;
    for (source, target) in compose_binds(service)? {
        if target.starts_with(CONTAINER_CONFIG_DIR) {
            files.add(&target, &read(&source)?)?;
        }
    }
    Ok(files)
}

#[test]
fn compose_wires_a_working_cluster() -> Result<()> {
    let compose = yaml("deploy/docker-compose.yml")?;
    let services = compose
        .get("services")
        .and_then(Yaml::as_mapping)
        .context("no services")?;
    let service = |name: &str| {
        services
            .get(name)
            .with_context(|| format!("no service {name}"))
    };
    let names: BTreeSet<String> = services
        .keys()
        .map(|k| str_of(k, "a service name").map(str::to_owned))
        .collect::<Result<_>>()?;
    let targets = dockerfile_targets()?;
    let node_help = Help::of(&node_binary()?)?;
    let worker_help = Help::of(&worker_binary()?)?;

    // Every service: its build target exists, its dependencies are
    // services, its bind mounts exist.
    let mut by_target: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, svc) in services {
        let name = str_of(name, "a service name")?;
        if let Some(target) = svc.get("build").and_then(|b| b.get("target")) {
            let target = str_of(target, "build.target")?;
            ensure!(
                targets.contains_key(target),
                "{name}: no Dockerfile target {target}"
            );
            by_target
                .entry(target.to_owned())
                .or_default()
                .push(name.to_owned());
        }
        if let Some(deps) = svc.get("depends_on") {
            let deps: Vec<String> = match deps {
                Yaml::Mapping(map) => map
                    .keys()
                    .map(|k| str_of(k, "depends_on").map(str::to_owned))
                    .collect::<Result<_>>()?,
                other => strings(other, "depends_on")?,
            };
            for dep in deps {
                ensure!(
                    names.contains(&dep),
                    "{name} depends on unknown service {dep}"
                );
            }
        }
        compose_binds(svc)?;
    }
    for needed in ["kafka", "postgres", "prometheus", "grafana", "kafka-topics"] {
        ensure!(names.contains(needed), "no {needed} service");
    }

    // The cache nodes: three, each loading its config; the member list
    // names each by its service name and its node id.
    let node_services = by_target
        .get("cache-node")
        .context("no cache-node service")?;
    ensure!(
        node_services.len() == 3,
        "{} cache nodes",
        node_services.len()
    );
    let mut nodes = BTreeMap::new();
    for name in node_services {
        let svc = service(name)?;
        let files = compose_config_dir(svc)?;
        let args = strings(svc.get("command").context("no command")?, "command")?;
        let config = load_node(&node_help, &files, &args, &compose_env(svc)?)
            .with_context(|| format!("service {name}"))?;
        nodes.insert(name.clone(), config);
    }
    let first = nodes.values().next().context("no nodes")?;
    let node_health_port = 7700;
    for (name, config) in &nodes {
        ensure!(
            config.cluster == first.cluster,
            "{name} has another member list"
        );
        ensure!(config.cluster.epoch >= 1, "{name}: cluster.epoch is 0");
        let member = config
            .cluster
            .members
            .iter()
            .find(|m| m.id == config.node_id)
            .with_context(|| format!("{name}'s node id {} is not a member", config.node_id))?;
        ensure!(
            member.address == format!("{name}:{}", config.listen.port()),
            "{name} is listed as {}",
            member.address
        );
        ensure!(
            config.advertise_address.as_deref() == Some(member.address.as_str()),
            "{name} advertises {:?}",
            config.advertise_address
        );
        ensure!(
            config.listen.ip().is_unspecified(),
            "{name} listens on {}",
            config.listen
        );
        ensure!(
            config.listen.port() == node_health_port,
            "the image's health check probes 7700"
        );
        let metrics = config.metrics_listen.context("no metrics")?;
        ensure!(metrics.ip().is_unspecified() && metrics.port() == 9700);
        ensure!(
            config.keyspaces_file.is_some(),
            "{name} has no keyspace file"
        );
    }
    ensure!(
        first.cluster.members.len() == nodes.len(),
        "members are not the node services"
    );

    // The worker: drains the write-back keyspaces of the shared file, from
    // the broker the kafka service advertises, into the postgres service.
    let worker_name = by_target
        .get("write-back-worker")
        .and_then(|w| w.first())
        .context("no worker service")?;
    let worker_svc = service(worker_name)?;
    // Kept until the end: `drained` reads the keyspace file again.
    let worker_files = compose_config_dir(worker_svc)?;
    let worker = load_worker(
        &worker_help,
        &worker_files,
        &strings(worker_svc.get("command").context("no command")?, "command")?,
        &compose_env(worker_svc)?,
    )?;
    let kafka_env = compose_env(service("kafka")?)?;
    let advertised = kafka_env
        .get("KAFKA_ADVERTISED_LISTENERS")
        .context("kafka advertises no listener")?;
    ensure!(
        advertised
            .split(',')
            .any(|l| l.ends_with(&format!("//{}", worker.brokers))),
        "the worker's brokers {} are not among {advertised}",
        worker.brokers
    );
    let roles = kafka_env
        .get("KAFKA_PROCESS_ROLES")
        .context("kafka has no roles")?;
    ensure!(
        roles.contains("controller") && roles.contains("broker"),
        "kafka is not in KRaft mode"
    );
    let pg_env = compose_env(service("postgres")?)?;
    let expected_url = format!(
        "postgres://{user}:{password}@postgres:5432/{db}",
        user = pg_env["POSTGRES_USER"],
        password = pg_env["POSTGRES_PASSWORD"],
        db = pg_env["POSTGRES_DB"],
    );
    ensure!(
        worker.database_url == expected_url,
        "database_url {}",
        worker.database_url
    );
    let members: BTreeSet<&str> = first
        .cluster
        .members
        .iter()
        .map(|m| m.address.as_str())
        .collect();
    ensure!(!worker.cache_seeds.is_empty());
    for seed in &worker.cache_seeds {
        ensure!(members.contains(seed.as_str()), "seed {seed} is no member");
    }
    let worker_metrics = worker
        .metrics_listen
        .context("the worker serves no metrics")?;
    ensure!(worker_metrics.ip().is_unspecified() && worker_metrics.port() == 9800);

    // The topics job creates exactly the drained keyspaces' topics, with
    // variables the script reads.
    let topics = service("kafka-topics")?;
    let entrypoint = strings(
        topics.get("entrypoint").context("no entrypoint")?,
        "entrypoint",
    )?;
    let script_at = entrypoint
        .iter()
        .position(|a| a.ends_with("create-topics.sh"))
        .context("kafka-topics does not run create-topics.sh")?;
    let created: BTreeSet<String> = entrypoint[script_at + 1..].iter().cloned().collect();
    ensure!(
        created == drained(&worker)?,
        "topics {created:?} vs drained {:?}",
        drained(&worker)?
    );
    let script = read("deploy/kafka/create-topics.sh")?;
    let topics_env = compose_env(topics)?;
    for name in topics_env.keys() {
        ensure!(
            script.contains(&format!("${{{name}")),
            "create-topics.sh does not read {name}"
        );
    }
    ensure!(topics_env.get("DEAD_LETTER_TOPIC") == Some(&worker.dead_letter_topic));
    let replication: u32 = topics_env["REPLICATION"].parse()?;
    let min_insync: u32 = topics_env["MIN_INSYNC_REPLICAS"].parse()?;
    ensure!(
        min_insync <= replication,
        "min.insync.replicas above the replication"
    );

    // Prometheus scrapes every node and the worker on their metrics ports,
    // and loads the alert rules it is given.
    let prometheus = service("prometheus")?;
    let binds = compose_binds(prometheus)?;
    let prom_config = binds
        .iter()
        .find(|(_, target)| target.ends_with("prometheus.yml"))
        .context("no prometheus.yml mounted")?;
    let prom = yaml(&prom_config.0)?;
    let mut scraped = BTreeSet::new();
    for job in seq_of(
        prom.get("scrape_configs").context("no scrape_configs")?,
        "scrape_configs",
    )? {
        for sc in seq_of(
            job.get("static_configs").context("no static_configs")?,
            "static_configs",
        )? {
            scraped.extend(strings(
                sc.get("targets").context("no targets")?,
                "targets",
            )?);
        }
    }
    let mut expected: BTreeSet<String> = nodes
        .iter()
        .map(|(name, c)| format!("{name}:{}", c.metrics_listen.map_or(0, |m| m.port())))
        .collect();
    expected.insert(format!("{worker_name}:{}", worker_metrics.port()));
    ensure!(
        scraped == expected,
        "scraped {scraped:?}, expected {expected:?}"
    );
    for rules in strings(
        prom.get("rule_files").context("no rule_files")?,
        "rule_files",
    )? {
        ensure!(
            binds.iter().any(|(_, t)| *t == rules),
            "rule file {rules} is not mounted"
        );
    }

    // Grafana: provisioned with the Prometheus service and the dashboards
    // directory it is given.
    let grafana_binds = compose_binds(service("grafana")?)?;
    let provisioning = grafana_binds
        .iter()
        .find(|(_, t)| t == "/etc/grafana/provisioning")
        .context("no provisioning mounted")?;
    let datasources = yaml(&format!("{}/datasources/prometheus.yml", provisioning.0))?;
    let url = str_of(&datasources["datasources"][0]["url"], "datasource url")?;
    ensure!(url == "http://prometheus:9090", "datasource {url}");
    let providers = yaml(&format!("{}/dashboards/ringcache.yml", provisioning.0))?;
    let path = str_of(
        &providers["providers"][0]["options"]["path"],
        "provider path",
    )?;
    let dashboards = grafana_binds
        .iter()
        .find(|(_, t)| t == path)
        .context("the dashboards provider's path is not mounted")?;
    ensure!(root().join(&dashboards.0).join("ringcache.json").is_file());
    Ok(())
}

#[test]
fn dockerfile_stages_and_health_checks_match_the_binaries() -> Result<()> {
    let stages = dockerfile_targets()?;
    let cachectl = Help::of(&cachectl_binary()?)?;
    for target in ["cache-node", "write-back-worker", "cachectl"] {
        let stage = stages
            .get(target)
            .with_context(|| format!("no target {target}"))?;
        ensure!(
            stage.contains(&format!("COPY --from=build /out/{target}")),
            "{target} does not ship its binary"
        );
        ensure!(
            stages["build"].contains(&format!("target/release/{target}")),
            "the build stage does not copy out {target}"
        );
        ensure!(
            stage.contains(&format!("ENTRYPOINT [\"{target}\"]")),
            "{target} does not run its binary"
        );
    }
    let runtime = stages.get("runtime").context("no runtime stage")?;
    let user = runtime
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .context("the runtime runs as root")?;
    ensure!(
        !user.starts_with('0') && !user.starts_with("root"),
        "USER {user}"
    );

    // The node's health check is cachectl's, with its flags, on the port
    // the deployments listen on.
    let node = &stages["cache-node"];
    let check = node
        .split("HEALTHCHECK")
        .nth(1)
        .and_then(|rest| rest.split("CMD").nth(1))
        .context("the node has no health check")?;
    let words: Vec<String> = serde_json::from_str(check.lines().next().unwrap_or_default().trim())?;
    ensure!(words[0] == "cachectl");
    cachectl.check_flags(&words)?;
    ensure!(
        cachectl.commands.contains("health"),
        "cachectl has no health command"
    );
    ensure!(words.iter().any(|w| w == "127.0.0.1:7700"));
    ensure!(node.contains("EXPOSE 7700 9700"));
    let worker = &stages["write-back-worker"];
    ensure!(worker.contains("HEALTHCHECK") && worker.contains("/dev/tcp/127.0.0.1/9800"));
    ensure!(worker.contains("EXPOSE 9800"));
    Ok(())
}

// ---------------------------------------------------------------------------
// Kubernetes.

fn env_of_container(
    container: &Yaml,
    pod_name: &str,
    namespace: &str,
) -> Result<BTreeMap<String, String>> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for var in seq_of(container.get("env").context("no env")?, "env")? {
        let name = str_of(&var["name"], "env name")?.to_owned();
        let value = if let Some(value) = var.get("value") {
            // Dependent variables: $(NAME) of one defined before.
            let mut value = str_of(value, "env value")?.to_owned();
            for (k, v) in &env {
                value = value.replace(&format!("$({k})"), v);
            }
            ensure!(
                !value.contains("$("),
                "{name} refers to an undefined variable"
            );
            value
        } else if let Some(field) = var.get("valueFrom").and_then(|v| v.get("fieldRef")) {
            match str_of(&field["fieldPath"], "fieldPath")? {
                "metadata.name" => pod_name.to_owned(),
                "metadata.namespace" => namespace.to_owned(),
                other => bail!("unexpected fieldPath {other}"),
            }
        } else if var
            .get("valueFrom")
            .and_then(|v| v.get("secretKeyRef"))
            .is_some()
        {
            // The Secret is the operator's; any well-formed value stands in.
            "postgres://ringcache:secret@postgres.example:5432/ringcache".to_owned()
        } else {
            bail!("env {name} has no value");
        };
        env.insert(name, value);
    }
    Ok(env)
}

fn container_port(container: &Yaml, name: &str) -> Result<u16> {
    for port in seq_of(container.get("ports").context("no ports")?, "ports")? {
        if port["name"].as_str() == Some(name) {
            return port["containerPort"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .context("containerPort");
        }
    }
    bail!("no container port named {name}")
}

fn labels_match(selector: &Yaml, labels: &Yaml) -> Result<()> {
    let selector = selector.as_mapping().context("selector is not a map")?;
    ensure!(!selector.is_empty(), "empty selector");
    for (k, v) in selector {
        ensure!(
            labels.get(k) == Some(v),
            "label {k:?}={v:?} is not on the pods"
        );
    }
    Ok(())
}

/// The config files of the ConfigMap a pod mounts at
/// [`CONTAINER_CONFIG_DIR`].
fn k8s_config_dir(
    pod_spec: &Yaml,
    container: &Yaml,
    config_maps: &BTreeMap<String, Yaml>,
) -> Result<ConfigDir> {
    let mount = seq_of(
        container.get("volumeMounts").context("no volumeMounts")?,
        "volumeMounts",
    )?
    .iter()
    .find(|m| m["mountPath"].as_str() == Some(CONTAINER_CONFIG_DIR))
    .context("nothing mounted at /etc/ringcache")?;
    let volume = seq_of(pod_spec.get("volumes").context("no volumes")?, "volumes")?
        .iter()
        .find(|v| v["name"] == mount["name"])
        .context("the mounted volume does not exist")?;
    let map_name = str_of(&volume["configMap"]["name"], "configMap name")?;
    let map = config_maps
        .get(map_name)
        .with_context(|| format!("no ConfigMap {map_name}"))?;
    let files = ConfigDir::new()?;
    for (key, value) in map["data"].as_mapping().context("no data")? {
        files.add(
            &format!("{CONTAINER_CONFIG_DIR}/{}", str_of(key, "key")?),
            str_of(value, "data")?,
        )?;
    }
    Ok(files)
}

#[test]
fn kubernetes_manifests_render_and_agree_with_the_binaries() -> Result<()> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join("deploy/k8s"))
        .output()
        .context("cannot run `kubectl kustomize`: is kubectl installed?")?;
    ensure!(
        out.status.success(),
        "kubectl kustomize failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = yaml_docs(&String::from_utf8(out.stdout)?)?;
    let mut by_kind: BTreeMap<String, Vec<&Yaml>> = BTreeMap::new();
    for doc in &docs {
        by_kind
            .entry(str_of(&doc["kind"], "kind")?.to_owned())
            .or_default()
            .push(doc);
    }
    let one = |kind: &str| -> Result<&Yaml> {
        let all = by_kind.get(kind).with_context(|| format!("no {kind}"))?;
        ensure!(all.len() == 1, "{} {kind}s", all.len());
        Ok(all[0])
    };
    let config_maps: BTreeMap<String, Yaml> = by_kind
        .get("ConfigMap")
        .context("no ConfigMap")?
        .iter()
        .map(|m| {
            Ok((
                str_of(&m["metadata"]["name"], "name")?.to_owned(),
                (*m).clone(),
            ))
        })
        .collect::<Result<_>>()?;
    let node_help = Help::of(&node_binary()?)?;
    let worker_help = Help::of(&worker_binary()?)?;

    // The cache nodes: a StatefulSet under a headless Service.
    let sts = one("StatefulSet")?;
    let sts_name = str_of(&sts["metadata"]["name"], "name")?;
    let namespace = str_of(&sts["metadata"]["namespace"], "namespace")?;
    let service_name = str_of(&sts["spec"]["serviceName"], "serviceName")?;
    let service = by_kind["Service"]
        .iter()
        .find(|s| s["metadata"]["name"].as_str() == Some(service_name))
        .context("the StatefulSet's service does not exist")?;
    ensure!(
        service["spec"]["clusterIP"].as_str() == Some("None"),
        "the service is not headless"
    );
    let pod = &sts["spec"]["template"];
    labels_match(&service["spec"]["selector"], &pod["metadata"]["labels"])?;
    labels_match(
        &sts["spec"]["selector"]["matchLabels"],
        &pod["metadata"]["labels"],
    )?;
    let pod_spec = &pod["spec"];
    let containers = seq_of(&pod_spec["containers"], "containers")?;
    ensure!(containers.len() == 1);
    let container = &containers[0];
    let args = strings(&container["args"], "args")?;
    let replicas = sts["spec"]["replicas"].as_u64().context("no replicas")?;
    ensure!(replicas >= 3, "{replicas} replicas");
    let grpc_port = container_port(container, "grpc")?;
    let metrics_port = container_port(container, "metrics")?;
    let grace = pod_spec["terminationGracePeriodSeconds"]
        .as_u64()
        .context("no grace period")?;
    let pods: Vec<String> = (0..replicas).map(|i| format!("{sts_name}-{i}")).collect();
    let mut member_list = None;
    for pod_name in &pods {
        let files = k8s_config_dir(pod_spec, container, &config_maps)?;
        let env = env_of_container(container, pod_name, namespace)?;
        let config = load_node(&node_help, &files, &args, &env)?;
        ensure!(
            config.node_id == *pod_name,
            "node id {} in pod {pod_name}",
            config.node_id
        );
        let own = format!("{pod_name}.{service_name}.{namespace}.svc:{grpc_port}");
        ensure!(config.advertise_address.as_deref() == Some(own.as_str()));
        ensure!(config.listen.port() == grpc_port && config.listen.ip().is_unspecified());
        ensure!(config.metrics_listen.map(|m| m.port()) == Some(metrics_port));
        ensure!(
            config.shutdown_grace < Duration::from_secs(grace),
            "shutdown_grace beyond the grace period"
        );
        let members: Vec<(String, String)> = config
            .cluster
            .members
            .iter()
            .map(|m| (m.id.clone(), m.address.clone()))
            .collect();
        let expected: Vec<(String, String)> = pods
            .iter()
            .map(|p| {
                (
                    p.clone(),
                    format!("{p}.{service_name}.{namespace}.svc:{grpc_port}"),
                )
            })
            .collect();
        ensure!(
            members == expected,
            "members {members:?}, expected {expected:?}"
        );
        ensure!(config.cluster.epoch >= 1);
        member_list = Some(members);
    }
    ensure!(member_list.is_some());
    // Probes: grpc.health.v1 on the gRPC port; readiness on the cache
    // service, which turns NOT_SERVING when shutdown starts.
    ensure!(container["livenessProbe"]["grpc"]["port"].as_u64() == Some(u64::from(grpc_port)));
    ensure!(container["readinessProbe"]["grpc"]["port"].as_u64() == Some(u64::from(grpc_port)));
    ensure!(container["readinessProbe"]["grpc"]["service"].as_str() == Some(NODE_HEALTH_SERVICE));
    for resource in ["cpu", "memory"] {
        ensure!(
            !container["resources"]["requests"][resource].is_null(),
            "no {resource} request"
        );
    }
    for port in seq_of(&service["spec"]["ports"], "ports")? {
        let target = str_of(&port["targetPort"], "targetPort")?;
        container_port(container, target)?;
    }

    // The worker: a Deployment reading the same ConfigMap.
    let deployment = one("Deployment")?;
    let wpod = &deployment["spec"]["template"];
    labels_match(
        &deployment["spec"]["selector"]["matchLabels"],
        &wpod["metadata"]["labels"],
    )?;
    let wcontainer = &seq_of(&wpod["spec"]["containers"], "containers")?[0];
    let worker_files = k8s_config_dir(&wpod["spec"], wcontainer, &config_maps)?;
    let worker = load_worker(
        &worker_help,
        &worker_files,
        &strings(&wcontainer["args"], "args")?,
        &env_of_container(wcontainer, "ringcache-write-back-worker-0", namespace)?,
    )?;
    ensure!(!drained(&worker)?.is_empty());
    let wmetrics = container_port(wcontainer, "metrics")?;
    ensure!(worker.metrics_listen.map(|m| m.port()) == Some(wmetrics));
    for probe in ["livenessProbe", "readinessProbe"] {
        ensure!(wcontainer[probe]["httpGet"]["path"].as_str() == Some("/metrics"));
        ensure!(wcontainer[probe]["httpGet"]["port"].as_str() == Some("metrics"));
    }
    ensure!(
        worker.cache_seeds == [format!("{service_name}.{namespace}.svc:{grpc_port}")],
        "seeds {:?}",
        worker.cache_seeds
    );
    for resource in ["cpu", "memory"] {
        ensure!(
            !wcontainer["resources"]["requests"][resource].is_null(),
            "no {resource} request"
        );
    }

    // A PodDisruptionBudget for each.
    let pdbs = by_kind
        .get("PodDisruptionBudget")
        .context("no PodDisruptionBudget")?;
    for labels in [&pod["metadata"]["labels"], &wpod["metadata"]["labels"]] {
        ensure!(
            pdbs.iter()
                .any(|p| labels_match(&p["spec"]["selector"]["matchLabels"], labels).is_ok()),
            "no PodDisruptionBudget selects {labels:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The dashboard and the alert rules.

/// Every `ringcache_*` name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("ringcache_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone());
                    }
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The `ringcache_client_*` names cache-client emits through the `metrics`
/// facade (its counters live in the services' own recorders, so no process
/// here exports them).
fn client_metric_names() -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    let mut dirs = vec![root().join("cache-client/src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path)?;
                for part in text.split("\"ringcache_client_").skip(1) {
                    if let Some((rest, _)) = part.split_once('"') {
                        names.insert(format!("ringcache_client_{rest}"));
                    }
                }
            }
        }
    }
    Ok(names)
}

/// The metric names (`# TYPE` lines) of a Prometheus exposition.
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_exported_metrics() -> Result<()> {
    // A node with RESP on, given a hit, a miss, a refused request and a
    // RESP error, so that its lazily registered series exist too.
    let mut config = NodeConfig::single("node-metrics")?;
    let resp = ringcache_tests::free_addr()?;
    config.extra_top_level = format!("resp_listen = \"{resp}\"\n");
    let metrics_addr = config.metrics_listen;
    let node = NodeProcess::start(config).await?;
    let client = Client::connect(ClientConfig::new(vec![node.addr().to_string()])).await?;
    client
        .set(
            "default",
            "k",
            Bytes::from_static(b"v"),
            SetOptions::new().version(1),
        )
        .await?;
    ensure!(client.get("default", "k").await?.is_some());
    ensure!(client.get("default", "absent").await?.is_none());
    ensure!(client.get("no-such-keyspace", "k").await.is_err());
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(resp).await?;
        stream.write_all(b"*1\r\n$9\r\nNOCOMMAND\r\n").await?;
        let mut reply = [0u8; 1];
        stream.read_exact(&mut reply).await?;
        ensure!(reply[0] == b'-', "an unknown RESP command was not refused");
    }
    let scraped = ringcache_tests::write_back::scrape(metrics_addr).await?;
    let mut exported = exposed_names(&scraped);
    ensure!(exported.contains("ringcache_node_request_errors_total"));
    ensure!(exported.contains("ringcache_node_resp_errors_total"));
    exported.extend(worker_metric_constants());
    exported.extend(client_metric_names()?);
    let known = |name: &str| {
        exported.contains(name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| exported.contains(base))
            })
    };

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/ringcache.json")?)?;
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    let mut used = BTreeSet::new();
    for expr in &exprs {
        used.extend(metric_names(expr));
    }
    let alerts = yaml("deploy/prometheus/alerts.yml")?;
    let mut alert_count = 0;
    for group in seq_of(&alerts["groups"], "groups")? {
        for rule in seq_of(&group["rules"], "rules")? {
            used.extend(metric_names(str_of(&rule["expr"], "expr")?));
            alert_count += 1;
        }
    }
    ensure!(alert_count >= 5, "{alert_count} alert rules");
    // The rules' `job` labels are the scrape jobs of prometheus.yml.
    let prom = yaml("deploy/prometheus/prometheus.yml")?;
    let jobs: BTreeSet<&str> = seq_of(&prom["scrape_configs"], "scrape_configs")?
        .iter()
        .filter_map(|job| job["job_name"].as_str())
        .collect();
    for group in seq_of(&alerts["groups"], "groups")? {
        for rule in seq_of(&group["rules"], "rules")? {
            let expr = str_of(&rule["expr"], "expr")?;
            for part in expr.split("job=\"").skip(1) {
                let job = part.split('"').next().unwrap_or_default();
                ensure!(
                    jobs.contains(job),
                    "alert on job {job:?}, which prometheus.yml does not scrape"
                );
            }
        }
    }
    let unknown: Vec<&String> = used.iter().filter(|n| !known(n)).collect();
    ensure!(unknown.is_empty(), "metrics no code exports: {unknown:?}");

    // What the dashboard must show: hit ratio, latency, evictions, leases,
    // 2PC outcomes, write-back lag and the oldest unstored write.
    for needed in [
        "ringcache_node_hits_total",
        "ringcache_node_misses_total",
        "ringcache_node_request_duration_seconds_bucket",
        "ringcache_node_evictions_total",
        "ringcache_node_leases_granted_total",
        "ringcache_node_commits_total",
        "ringcache_node_aborts_total",
        "ringcache_client_twopc_commits_total",
        "ringcache_wb_consumer_lag_records",
        "ringcache_wb_lag_seconds_bucket",
        "ringcache_wb_oldest_unstored_seconds",
    ] {
        ensure!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    drop(node);
    Ok(())
}

// ---------------------------------------------------------------------------
// Member addresses are host names resolved when a client connects.

#[tokio::test]
async fn member_addresses_may_be_host_names() -> Result<()> {
    let mut config = NodeConfig::single("node-dns")?;
    // The health wait then checks only the node's id: the member list it
    // would compare holds socket addresses.
    config.members.clear();
    let port = config.listen.port();
    let text = format!(
        "node_id = \"node-dns\"\nlisten = \"{}\"\nmetrics_listen = \"{}\"\n\
         advertise_address = \"localhost:{port}\"\n\
         [cluster]\nepoch = 2\nmembers = [{{ id = \"node-dns\", address = \"localhost:{port}\" }}]\n",
        config.listen, config.metrics_listen
    );
    let mut node = NodeProcess::spawn_with(config, |command, path| {
        std::fs::write(path, &text).expect("the node's temporary directory is writable");
        command.arg("--config").arg(path);
    })?;
    node.wait_healthy(Duration::from_secs(30)).await?;
    let client = Client::connect(ClientConfig::new(vec![format!("localhost:{port}")])).await?;
    let topology = client.topology();
    ensure!(topology.epoch == 2);
    ensure!(topology.members.len() == 1);
    ensure!(topology.members[0].address == format!("localhost:{port}"));
    client
        .set(
            "default",
            "k",
            Bytes::from_static(b"through a name"),
            SetOptions::new().version(1),
        )
        .await?;
    let entry = client
        .get("default", "k")
        .await?
        .context("the write is not there")?;
    ensure!(entry.value == Bytes::from_static(b"through a name"));
    Ok(())
}

// ---------------------------------------------------------------------------
// The configuration reference.

/// One step of a path into a config struct.
#[derive(Clone, Debug)]
enum Step {
    Field(String),
    /// Any key of a map (`<name>` in the doc).
    AnyKey,
    /// Every item of a list (`[]` in the doc).
    Item,
}

fn path_text(path: &[Step]) -> String {
    let mut text = String::new();
    for step in path {
        match step {
            Step::Field(name) => {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push_str(name);
            }
            Step::AnyKey => text.push_str(".<name>"),
            Step::Item => text.push_str("[]"),
        }
    }
    text
}

/// A TOML value that puts `{ __probe__ = 1 }` at `path`.
fn probe_value(path: &[Step]) -> toml::Value {
    let mut value = toml::Value::Table(toml::Table::from_iter([(
        "__probe__".to_owned(),
        toml::Value::Integer(1),
    )]));
    for step in path.iter().rev() {
        value = match step {
            Step::Field(name) => {
                toml::Value::Table(toml::Table::from_iter([(name.clone(), value)]))
            }
            Step::AnyKey => {
                toml::Value::Table(toml::Table::from_iter([("example".to_owned(), value)]))
            }
            Step::Item => toml::Value::Array(vec![value]),
        };
    }
    value
}

/// Every leaf setting of the config type `T`, found by asking serde: a
/// struct refusing unknown fields lists its fields in the error for
/// `__probe__`; a map of structs refuses `1` as a value; a list refuses a
/// table. Each field is followed down until it takes a plain value.
fn settings_of<T: serde::de::DeserializeOwned>() -> Result<BTreeSet<String>> {
    fn walk<T: serde::de::DeserializeOwned>(
        path: Vec<Step>,
        out: &mut BTreeSet<String>,
        depth: usize,
    ) -> Result<()> {
        ensure!(
            depth < 8,
            "config nesting deeper than 8 at {}",
            path_text(&path)
        );
        let message = match probe_value(&path).try_into::<T>() {
            Ok(_) => bail!("{} accepts unknown fields", path_text(&path)),
            Err(e) => e.to_string(),
        };
        if let Some(rest) = message.split("unknown field `__probe__`").nth(1) {
            // The first line lists the fields; later ones say where
            // (`in \`cluster\``).
            let first_line = rest.lines().next().unwrap_or_default();
            let listed = first_line.split_once("expected").map_or("", |(_, l)| l);
            let fields: Vec<&str> = listed.split('`').skip(1).step_by(2).collect();
            for field in fields {
                let mut next = path.clone();
                next.push(Step::Field(field.to_owned()));
                walk::<T>(next, out, depth + 1)?;
            }
        } else if message.contains("invalid type: integer `1`") && !path.is_empty() {
            let mut next = path;
            next.push(Step::AnyKey);
            walk::<T>(next, out, depth + 1)?;
        } else if message.contains("expected a sequence")
            && !matches!(path.last(), Some(Step::Item))
        {
            let mut next = path;
            next.push(Step::Item);
            walk::<T>(next, out, depth + 1)?;
        } else {
            // A list of plain values is one setting.
            let mut path = path;
            if matches!(path.last(), Some(Step::Item)) {
                path.pop();
            }
            out.insert(path_text(&path));
        }
        Ok(())
    }
    let mut out = BTreeSet::new();
    walk::<T>(Vec::new(), &mut out, 0)?;
    Ok(out)
}

/// The doc's sections: `## title` → `### title` → its text.
fn doc_sections(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let (mut h2, mut h3) = (String::new(), String::new());
    for line in text.lines() {
        if let Some(title) = line.strip_prefix("## ") {
            h2 = title.trim().to_owned();
            h3.clear();
        } else if let Some(title) = line.strip_prefix("### ") {
            h3 = title.trim().to_owned();
        } else {
            let body = sections
                .entry(h2.clone())
                .or_default()
                .entry(h3.clone())
                .or_default();
            body.push_str(line);
            body.push('\n');
        }
    }
    sections
}

/// The table rows of a section: the backticked first token of each cell.
fn table_rows(section: &str) -> Vec<Vec<Option<String>>> {
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|cell| cell.trim().split('`').nth(1).map(str::to_owned))
                .collect()
        })
        .collect()
}

fn section<'a>(
    sections: &'a BTreeMap<String, BTreeMap<String, String>>,
    h2: &str,
    h3: &str,
) -> Result<&'a str> {
    sections
        .get(h2)
        .and_then(|s| s.get(h3))
        .map(String::as_str)
        .with_context(|| format!("docs/configuration.md has no \"## {h2}\" / \"### {h3}\""))
}

fn check_settings(doc: &str, expected: &BTreeSet<String>, what: &str) -> Result<()> {
    let documented: BTreeSet<String> = table_rows(doc)
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
        .collect();
    let missing: Vec<_> = expected.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(expected).collect();
    ensure!(
        missing.is_empty() && extra.is_empty(),
        "docs/configuration.md, {what}: undocumented settings {missing:?}; documented settings the code does not have {extra:?}"
    );
    Ok(())
}

fn check_command_line(doc: &str, help: &Help, what: &str) -> Result<()> {
    let mut documented = BTreeMap::new();
    for row in table_rows(doc) {
        let flag = row
            .first()
            .cloned()
            .flatten()
            .context("a row without a flag")?;
        let env = row.get(1).cloned().flatten();
        documented.insert(flag, env);
    }
    let actual: BTreeMap<String, Option<String>> = help
        .options
        .iter()
        .map(|(flag, o)| (flag.clone(), o.env.clone()))
        .collect();
    ensure!(
        documented == actual,
        "docs/configuration.md, {what}: the documented flags and variables\n{documented:?}\ndiffer from --help's\n{actual:?}"
    );
    Ok(())
}

#[test]
fn the_configuration_reference_matches_the_code() -> Result<()> {
    let sections = doc_sections(&read("docs/configuration.md")?);

    let node = settings_of::<cache_node::config::Config>()?;
    ensure!(node.contains("limits.max_key_bytes") && node.contains("cluster.members[].address"));
    ensure!(node.contains("keyspaces.<name>.capacity_bytes"));
    check_settings(
        section(&sections, "cache-node", "Config file")?,
        &node,
        "cache-node",
    )?;
    let worker = settings_of::<write_back_worker::config::Config>()?;
    check_settings(
        section(&sections, "write-back-worker", "Config file")?,
        &worker,
        "write-back-worker",
    )?;
    let keyspaces = settings_of::<cache_client::keyspaces::KeyspacesFile>()?;
    ensure!(keyspaces.contains("keyspaces.<name>.strategy"));
    check_settings(
        section(&sections, "The keyspace file", "Keyspace entries")?,
        &keyspaces,
        "the keyspace file",
    )?;

    let node_help = Help::of(&node_binary()?)?;
    check_command_line(
        section(&sections, "cache-node", "Command line")?,
        &node_help,
        "cache-node",
    )?;
    let worker_help = Help::of(&worker_binary()?)?;
    check_command_line(
        section(&sections, "write-back-worker", "Command line")?,
        &worker_help,
        "write-back-worker",
    )?;
    let cachectl = Help::of(&cachectl_binary()?)?;
    check_command_line(
        section(&sections, "cachectl", "Command line")?,
        &cachectl,
        "cachectl",
    )?;
    let documented: BTreeSet<String> = table_rows(section(&sections, "cachectl", "Commands")?)
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
        .filter_map(|c| c.strip_prefix("cachectl ").map(str::to_owned))
        .collect();
    ensure!(
        documented == cachectl.commands,
        "cachectl's commands: documented {documented:?}, --help {:?}",
        cachectl.commands
    );

    // Every environment variable the deploy files set is one of the
    // binaries' (they are checked against the binary that reads them in
    // the compose and Kubernetes tests; this catches the rest).
    let all_envs: BTreeSet<String> = [&node_help, &worker_help, &cachectl]
        .iter()
        .flat_map(|h| h.envs())
        .collect();
    for file in [
        "deploy/docker-compose.yml",
        "deploy/k8s/cache-node.yaml",
        "deploy/k8s/write-back-worker.yaml",
        "deploy/Dockerfile",
    ] {
        let text = read(file)?;
        for part in text.split("RINGCACHE_").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            let name = format!("RINGCACHE_{name}");
            ensure!(
                all_envs.contains(&name),
                "{file} sets {name}, which no binary reads"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The containers' health check.

#[tokio::test]
async fn cachectl_health_tells_a_serving_node_from_a_missing_one() -> Result<()> {
    let node = NodeProcess::start(NodeConfig::single("node-health")?).await?;
    let cachectl = cachectl_binary()?;
    let run = |seeds: String| {
        let mut command = std::process::Command::new(&cachectl);
        command.args(["--seeds", &seeds, "--deadline", "2s", "--json", "health"]);
        command.output()
    };
    let out = run(node.addr().to_string())?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(line["status"] == "SERVING", "{line}");

    // A port nothing listens on: the check fails, naming it.
    let missing = ringcache_tests::free_addr()?;
    let out = run(format!("{},{missing}", node.addr()))?;
    ensure!(
        !out.status.success(),
        "a missing node passed the health check"
    );
    ensure!(String::from_utf8_lossy(&out.stderr).contains(&missing.to_string()));
    Ok(())
}

// ---------------------------------------------------------------------------
// The worker's metric names, scraped.

/// The worker's metric-name constants (`write_back_worker::metrics`).
fn worker_metric_constants() -> BTreeSet<String> {
    use write_back_worker::metrics::*;
    [
        RECORDS_APPLIED_TOTAL,
        RECORDS_STALE_TOTAL,
        RECORDS_COALESCED_TOTAL,
        BATCHES_TOTAL,
        BATCH_RECORDS,
        DEAD_LETTERS_TOTAL,
        RETRIES_TOTAL,
        BATCH_SECONDS,
        LAG_SECONDS,
        DIRTY_REPAIRED_TOTAL,
        OLDEST_UNSTORED_SECONDS,
        CONSUMER_LAG_RECORDS,
        PG_PREPARED_TRANSACTIONS,
        PG_OLDEST_PREPARED_TRANSACTION_SECONDS,
    ]
    .map(str::to_owned)
    .into()
}

/// A worker that stored a few writes exports, under the names of its
/// constants, every write-back series the dashboard plots that a run
/// without failures produces (retries, dead letters, repairs, stale and
/// coalesced records are counted only when they happen).
// Multi-threaded for `block_in_place`: starting PostgreSQL blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_exports_the_dashboards_write_back_metrics() -> Result<()> {
    use cache_client::{
        producer::WriteBackConfig,
        store::PgStore,
        strategy::{KeyspaceSettings, Strategy},
    };
    use ringcache_tests::{
        PrivateBroker, PrivatePostgres, WorkerConfig, WorkerProcess, cluster, unique,
        write_back::{Expected, put_acknowledged, scrape, wait_stored},
    };
    const TIMEOUT: Duration = Duration::from_secs(120);

    let pg = tokio::task::block_in_place(PrivatePostgres::start)?;
    let store = PgStore::connect(&pg.url()).await?;
    store.migrate().await?;
    let broker = PrivateBroker::start(TIMEOUT).await?;
    let nodes = cluster(1).await?;
    let keyspace = unique("deploy_wb");
    let client = Client::connect(ClientConfig::new(
        nodes.iter().map(|n| n.addr().to_string()),
    ))
    .await?;
    client.enable_write_back(WriteBackConfig::new(broker.brokers()))?;
    client.define_keyspace(
        &keyspace,
        KeyspaceSettings::new(Strategy::WriteBack),
        Some(std::sync::Arc::new(PgStore::from_pool(
            store.pool().clone(),
        ))),
    )?;
    client.ensure_write_back_topics().await?;
    let mut worker = WorkerProcess::start(WorkerConfig {
        brokers: broker.brokers(),
        database_url: pg.url(),
        group: format!("{keyspace}_group"),
        keyspaces: vec![keyspace.clone()],
        cache_seeds: nodes.iter().map(|n| n.addr().to_string()).collect(),
    })?;
    let mut expected = Expected::new();
    for i in 0..5 {
        let (key, value) = (format!("k{i}"), format!("v{i}"));
        let version = put_acknowledged(&client, &keyspace, &key, &value, TIMEOUT).await?;
        expected.insert(
            key.into_bytes(),
            (Some(value.into_bytes()), i64::try_from(version)?),
        );
    }
    wait_stored(store.pool(), &mut worker, &keyspace, &expected, TIMEOUT).await?;

    let dashboard = read("deploy/grafana/dashboards/ringcache.json")?;
    let counted_on_failure = {
        use write_back_worker::metrics::*;
        [
            RETRIES_TOTAL,
            DEAD_LETTERS_TOTAL,
            DIRTY_REPAIRED_TOTAL,
            RECORDS_STALE_TOTAL,
            RECORDS_COALESCED_TOTAL,
        ]
    };
    let wanted: BTreeSet<String> = metric_names(&dashboard)
        .into_iter()
        .filter(|n| n.starts_with("ringcache_wb_"))
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s).map(str::to_owned))
                .unwrap_or(n)
        })
        .filter(|n| !counted_on_failure.contains(&n.as_str()))
        .collect();
    ensure!(wanted.len() >= 5, "the dashboard plots {wanted:?}");
    // The lag gauges come from librdkafka's statistics, every few seconds:
    // scrape until every wanted series is there.
    let metrics = worker.metrics_addr(TIMEOUT).await?;
    let constants = worker_metric_constants();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let scraped: BTreeSet<String> = exposed_names(&scrape(metrics).await?)
            .into_iter()
            .filter(|n| n.starts_with("ringcache_wb_"))
            .collect();
        let unnamed: Vec<_> = scraped.difference(&constants).collect();
        ensure!(
            unnamed.is_empty(),
            "exported without a constant: {unnamed:?}"
        );
        let missing: Vec<_> = wanted.difference(&scraped).collect();
        if missing.is_empty() {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the worker does not export {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
