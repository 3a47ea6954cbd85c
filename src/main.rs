//! The `patroxy` command: parses the CLI, loads and checks the configuration, binds the
//! listeners, and runs `app::run` until SIGTERM or SIGINT.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use patroxy::config::{Config, Overrides};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "patroxy",
    version,
    about = "A PostgreSQL proxy that follows the Patroni leader in etcd"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the biggest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(RunArgs),
    /// Check a configuration file, print every problem, exit non-zero if there is any.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Show each cluster like `patronictl list`, with the listeners that route to each member.
    Status(StatusArgs),
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    source: Source,
    /// Ask one running patroxy's admin endpoint (host:port) instead of etcd.
    #[arg(long)]
    admin: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// Where the configuration comes from: the file, and the flags that override it.
#[derive(Args)]
struct Source {
    /// TOML configuration file; flags and PATROXY_* variables override it.
    #[arg(long, short, env = "PATROXY_CONFIG")]
    config: Option<PathBuf>,
    /// etcd endpoint(s), e.g. http://127.0.0.1:2379 (repeat, or separate with commas).
    #[arg(long, env = "PATROXY_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Patroni scope (the cluster name).
    #[arg(long, env = "PATROXY_SCOPE")]
    scope: Option<String>,
    /// Patroni namespace [default: /service].
    #[arg(long, env = "PATROXY_NAMESPACE")]
    namespace: Option<String>,
}

impl Source {
    fn overrides(self) -> (Option<PathBuf>, Overrides) {
        let o = Overrides {
            etcd: self.etcd,
            scope: self.scope,
            namespace: self.namespace,
            ..Overrides::default()
        };
        (self.config, o)
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    source: Source,
    /// Address of a listener that routes to the primary (repeatable); replaces the file's.
    #[arg(long, env = "PATROXY_PRIMARY", value_delimiter = ',')]
    primary: Vec<String>,
    /// Address of a listener that balances over replicas (repeatable); replaces the file's.
    #[arg(long, env = "PATROXY_REPLICA", value_delimiter = ',')]
    replica: Vec<String>,
    /// How long a new connection waits for a primary, e.g. 15s.
    #[arg(long, env = "PATROXY_CONNECT_WAIT", value_parser = humantime::parse_duration)]
    connect_wait: Option<Duration>,
    /// How long sessions on a deposed primary get to reach a rest point, e.g. 500ms.
    #[arg(long, env = "PATROXY_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
    /// Address of the admin HTTP endpoint (/health, /ready), e.g. 127.0.0.1:9187.
    #[arg(long, env = "PATROXY_ADMIN")]
    admin: Option<String>,
    /// The host other instances reach this one at, for cancels (report.address), e.g. a
    /// pod's IP.
    #[arg(long, env = "PATROXY_REPORT_ADDRESS")]
    report_address: Option<String>,
    /// Relay threads, each with its own runtime: 0 = one per core.
    #[arg(long, env = "PATROXY_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Log filter, e.g. info or patroxy=debug.
    #[arg(long, env = "PATROXY_LOG", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // check-config lists each problem on a line of its own; the others say it in one line.
    let (result, one_line) = match cli.command {
        Command::CheckConfig { file } => (check_config(&file), false),
        Command::Run(args) => (run(args), true),
        Command::Status(args) => (status(args), true),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = format!("{e:#}");
            match one_line {
                true => eprintln!(
                    "patroxy: {}",
                    text.replace(":\n  - ", ": ")
                        .replace("\n  - ", "; ")
                        .replace('\n', " ")
                ),
                false => eprintln!("patroxy: {text}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    config.validate()?;
    for w in config.warnings() {
        println!("warning: {w}");
    }
    println!("{}: ok", file.display());
    Ok(())
}

fn status(args: StatusArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let status = runtime.block_on(async {
        match &args.admin {
            Some(addr) => patroxy::status::from_admin(addr).await,
            None => {
                let (file, overrides) = args.source.overrides();
                let config = load(file.as_deref(), overrides)?;
                patroxy::status::from_etcd(&config).await
            }
        }
        .map_err(anyhow::Error::from)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", patroxy::status::render(&status));
    }
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.log).with_context(|| format!("--log {:?}", args.log))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(patroxy::logline::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let (file, overrides) = args.source.overrides();
    let overrides = Overrides {
        primary: args.primary,
        replica: args.replica,
        connect_wait: args.connect_wait,
        drain_timeout: args.drain_timeout,
        worker_threads: args.worker_threads,
        admin: args.admin,
        report_address: args.report_address,
        ..overrides
    };
    let config = load(file.as_deref(), overrides.clone())?;
    let config = Arc::new(config);

    let runtime = if config.runtime.work_stealing {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if config.runtime.worker_threads > 0 {
            b.worker_threads(config.runtime.worker_threads);
        }
        b.enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .context("starting the runtime")?;
    let threads = match config.runtime.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };

    runtime.block_on(async move {
        // This thread is the first relay thread; work stealing spreads sessions itself.
        let (workers, _threads) = if config.runtime.work_stealing {
            (patroxy::workers::Workers::default(), None)
        } else {
            let (w, t) =
                patroxy::workers::Workers::start(threads).context("starting the relay threads")?;
            (w, Some(t))
        };
        let listeners = patroxy::listener::bind(&config).await?;
        let admin = match patroxy::listener::bind_admin(&config).await? {
            Some(listener) => {
                let metrics = patroxy::metrics::install().map_err(anyhow::Error::msg)?;
                Some(patroxy::admin::Admin {
                    listener,
                    metrics: Some(metrics),
                })
            }
            None => None,
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        let (reload_tx, configs) = tokio::sync::mpsc::channel(1);
        let requests = std::sync::Arc::new(tokio::sync::Notify::new());
        tokio::spawn(reload_on_sighup(
            file,
            overrides,
            reload_tx,
            requests.clone(),
        ));
        let reloads = patroxy::app::Reloads { configs, requests };
        patroxy::app::run(config, listeners, admin, reloads, workers, shutdown).await?;
        Ok(())
    })
}

/// The configuration: the file if there is one, the overrides on top, checked.
fn load(file: Option<&std::path::Path>, overrides: Overrides) -> anyhow::Result<Config> {
    let mut config = match file {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    config.apply(overrides);
    config.validate()?;
    Ok(config)
}

/// SIGHUP (or the console's RELOAD, through `requests`) reads the configuration file again
/// (with the same flags on top) and hands it to the running proxy; a file that does not load
/// or validate is refused here with a log line.
async fn reload_on_sighup(
    file: Option<PathBuf>,
    overrides: Overrides,
    tx: tokio::sync::mpsc::Sender<Config>,
    requests: std::sync::Arc<tokio::sync::Notify>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler: no configuration reloads");
        return;
    };
    loop {
        tokio::select! {
            got = hup.recv() => match got {
                Some(()) => tracing::info!("SIGHUP: reloading the configuration"),
                None => return,
            },
            _ = requests.notified() => tracing::info!("RELOAD from the admin console: reloading the configuration"),
        }
        // Read on a blocking thread: a slow disk must not stall the sessions on the runtime.
        let (f, o) = (file.clone(), overrides.clone());
        let loaded = tokio::task::spawn_blocking(move || load(f.as_deref(), o))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("reading the configuration: {e}")));
        match loaded {
            Ok(config) => {
                if tx.send(config).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                patroxy::metrics::reload("refused");
                let why = format!("{e:#}").replace('\n', " ");
                tracing::warn!(reason = %why, "configuration reload refused; the running configuration stays in force");
            }
        }
    }
}

/// SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received: shutting down (again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    std::process::exit(130);
}
