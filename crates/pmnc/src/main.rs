//! The `pmnc` command: thin glue from the command line to the cage runtime.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use rustomnic_cage::{Error, Protocols, RunOptions};

mod health;
mod logs;

/// glibc's malloc fragments under bursts of connections and costs more per call; Lua and hyper
/// allocate on every request (docs/decisions/010-allocator.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXAMPLES: &str = "\
Examples:
  pmnc run examples/hello                 run one cage (a folder holding cage.toml)
  pmnc run examples/two-cages             run every cage under examples/two-cages/cages
  pmnc run app --workers 4 --log-level debug
  pmnc check examples/two-cages           validate config and compile every module
  pmnc test examples/two-cages            run the test_* functions of every *_test.lua
  pmnc new myapp                          make an app with one cage to start from
  pmnc new --cage worker myapp            add the cage myapp/cages/worker to that app
  pmnc run app/cages/worker --cluster nats://127.0.0.1:4222
                                          join other processes over NATS (docs/cluster.md)
  pmnc cluster status --cluster nats://127.0.0.1:4222
                                          list the cages and instances of the flock";

#[derive(Parser)]
#[command(name = "pmnc", version, about = "Rustomnic: run cages of hot-reloaded Lua modules behind interfaces.", after_help = EXAMPLES)]
struct Cli {
    /// error, warn, info, debug or trace; wins over RUST_LOG and log_level in cage.toml.
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// text or json (one JSON object per line); wins over log_format in cage.toml.
    #[arg(long, global = true)]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a cage folder, or every cage under an app folder's cages/, until SIGINT/SIGTERM.
    Run {
        /// A cage folder (holding cage.toml) or an app folder (holding cages/).
        path: PathBuf,
        /// Worker threads, each with its own Lua VM of every cage (default: the number of cores).
        #[arg(long)]
        workers: Option<usize>,
        /// Do not reload changed modules.
        #[arg(long)]
        no_watch: bool,
        /// NATS server(s) to join (comma-separated or repeated); overrides [cluster] url.
        #[arg(long, value_delimiter = ',')]
        cluster: Vec<String>,
        /// The flock (cluster namespace) to join; overrides [cluster] flock (default "default").
        #[arg(long)]
        flock: Option<String>,
    },
    /// Look at the cluster: `pmnc cluster status`.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Validate every cage.toml and compile every module; list every problem found.
    Check { path: PathBuf },
    /// Run the test_* functions of every *_test.lua module inside running cages.
    Test {
        path: PathBuf,
        /// Run only tests whose "cage.module.function" name contains this text.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Make a new app folder with one cage (web) to start from, or with --cage add a cage to an
    /// existing app.
    New {
        /// The app folder to create (it must not exist); with --cage, the app (default: the
        /// current folder, or the app folder above it).
        path: Option<PathBuf>,
        /// Add a cage of this name to the app at PATH: cages/NAME with a cage.toml and a module.
        #[arg(long, value_name = "NAME")]
        cage: Option<String>,
    },
    /// Ask a health endpoint of the monitor; exit 0 when it answers 200 (a container's
    /// HEALTHCHECK: `pmnc health http://127.0.0.1:9100/healthz`).
    Health {
        /// The endpoint: http://HOST:PORT/healthz or /readyz.
        url: String,
        /// How long to wait for the answer.
        #[arg(long, default_value = "3s")]
        timeout: String,
    },
    /// Bare NATS request/reply, the yardstick of bench/cluster.sh.
    #[command(hide = true)]
    RawNats {
        url: String,
        /// Answer requests instead of sending them.
        #[arg(long)]
        respond: bool,
        #[arg(long, default_value = "bench.echo")]
        subject: String,
        #[arg(long, default_value_t = 1)]
        in_flight: usize,
        #[arg(long, default_value_t = 10000)]
        count: usize,
        #[arg(long, default_value_t = 16)]
        payload_bytes: usize,
    },
    /// Inspect and repair the durable call queues of cages (their .data files).
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Serve hello-world from pure hyper with the same worker layout (for benchmarks).
    #[command(hide = true)]
    RawHttp {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// List every cage and instance of the flock, up or down, from their heartbeats.
    Status {
        /// A cage or app folder whose [cluster] table to use (servers, flock, credentials).
        path: Option<PathBuf>,
        /// NATS server(s) to ask (comma-separated); overrides the folder's [cluster] url.
        #[arg(long, value_delimiter = ',')]
        cluster: Vec<String>,
        /// The flock to list (default: the folder's, else "default").
        #[arg(long)]
        flock: Option<String>,
        /// How long to collect answers.
        #[arg(long, default_value = "1s")]
        wait: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `pmnc cluster status`.
fn cluster_status(path: Option<PathBuf>, cluster: Vec<String>, flock: Option<String>, wait: &str, json: bool) -> Result<(), String> {
    let wait = rustomnic_core::parse_duration(wait).map_err(|e| format!("--wait: {e}"))?;
    let options = RunOptions { cluster, flock, ..RunOptions::default() };
    let cages = match &path {
        Some(p) => rustomnic_cage::prepare(p, &protocols(), false).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let config = rustomnic_cage::runtime::cluster_config(&cages, &options)
        .map_err(|e| e.to_string())?
        .ok_or("give --cluster nats://HOST:PORT, or a cage folder with a [cluster] table")?;
    let instances = rustomnic_cluster::presence::ask_blocking(&config, wait).map_err(|e| e.to_string())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&instances).unwrap_or_default());
    } else if instances.is_empty() {
        println!("no instance answered in flock {} at {} within {wait:?}", config.flock, config.servers());
    } else {
        print!("{}", rustomnic_cluster::presence::table(&instances));
    }
    Ok(())
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Figures per queue and the calls waiting or dead.
    Ls {
        path: PathBuf,
        /// Show at most this many calls per cage.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Everything stored about one call.
    Show { path: PathBuf, id: String },
    /// Run a failed or dead call again now.
    Retry { path: PathBuf, id: String },
    /// Cancel a waiting (or running) call: it is not started again (docs/queues.md).
    Cancel { path: PathBuf, id: String },
    /// Delete every call not done (or, with --dead, only dead letters).
    Purge {
        path: PathBuf,
        #[arg(long)]
        dead: bool,
    },
}

/// `pmnc queue ...` on every cage at PATH.
fn queue_command(command: QueueCommand) -> Result<(), String> {
    let path = match &command {
        QueueCommand::Ls { path, .. }
        | QueueCommand::Show { path, .. }
        | QueueCommand::Retry { path, .. }
        | QueueCommand::Cancel { path, .. }
        | QueueCommand::Purge { path, .. } => path.clone(),
    };
    let mut cages = Vec::new();
    // Queues with store = "cluster" keep their calls in JetStream (rustomnic_queue::jetstream).
    let mut clustered = Vec::new();
    for dir in rustomnic_cage::find_cages(&path).map_err(|e| e.to_string())? {
        let config = rustomnic_cage::load_cage(&dir, &protocols()).map_err(|errors| errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))?;
        clustered.push((config.name.clone(), config.queues.clone(), config.cluster.as_ref().map(|c| c.value.clone())));
        cages.push((config.name, config.state_file));
    }
    let mut out = std::io::stdout();
    let clustered_of: Vec<rustomnic_queue::admin_cluster::Clustered> =
        clustered.iter().map(|(cage, queues, cluster)| rustomnic_queue::admin_cluster::Clustered { cage, queues, cluster: cluster.as_ref() }).collect();
    match command {
        QueueCommand::Ls { limit, .. } => {
            for (cage, file) in &cages {
                if file.exists() {
                    rustomnic_queue::admin::ls(cage, file, limit, &mut out)?;
                } else {
                    println!("cage {cage}: no calls ({} does not exist yet)", file.display());
                }
                if let Some((_, queues, cluster)) = clustered.iter().find(|(name, _, _)| name == cage) {
                    rustomnic_queue::admin::ls_clustered(cage, queues, cluster.as_ref(), &mut out)?;
                }
            }
            Ok(())
        }
        QueueCommand::Show { id, .. } => {
            // A workflow id: its steps in every cage at PATH (docs/queues.md, "Workflows").
            if rustomnic_queue::admin::show_workflow(&cages, &id, &mut out)? {
                return Ok(());
            }
            let mut last = format!("no call {id:?}");
            for (cage, file) in cages.iter().filter(|(_, f)| f.exists()) {
                match rustomnic_queue::admin::show(cage, file, &id, &mut out) {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e,
                }
            }
            // Then the clustered queues: their calls are in JetStream.
            for c in &clustered_of {
                if rustomnic_queue::admin_cluster::show(*c, &id, &mut out)? {
                    return Ok(());
                }
            }
            Err(last)
        }
        QueueCommand::Retry { id, .. } => {
            let mut last = format!("no call {id:?}");
            for (cage, file) in cages.iter().filter(|(_, f)| f.exists()) {
                match rustomnic_queue::admin::retry(file, &id, std::time::Duration::from_secs(86_400)) {
                    Ok(()) => {
                        println!("call {id} of cage {cage} will run again now");
                        return Ok(());
                    }
                    Err(e) => last = e,
                }
            }
            for c in &clustered_of {
                if let Some(said) = rustomnic_queue::admin_cluster::retry(*c, &id, std::time::Duration::from_secs(86_400))? {
                    println!("{said}");
                    return Ok(());
                }
            }
            Err(last)
        }
        QueueCommand::Cancel { id, .. } => {
            // A workflow id: cancelled in every cage at PATH, then its steps on clustered
            // queues that those files know of, through the records in their buckets.
            if let Some(lines) = rustomnic_queue::admin::cancel_workflow(&cages, &id, std::time::Duration::from_secs(3 * 86_400))? {
                for l in lines {
                    println!("{l}");
                }
                let steps = rustomnic_queue::admin_cluster::cancel_workflow(&cages, &clustered_of, &id)?;
                for l in steps.lines {
                    println!("{l}");
                }
                if !steps.unreached.is_empty() {
                    return Err(format!(
                        "workflow {id}: marked cancelled in the files at {} (those marks hold), but steps on clustered queues were not reached: {}; run pmnc queue cancel again once NATS answers",
                        path.display(),
                        steps.unreached.join("; ")
                    ));
                }
                return Ok(());
            }
            // The first cage whose file knows the id answers; a record of a cancelled call is
            // kept for a queue's default de-duplication window.
            let mut last = format!("no call {id:?}");
            for (cage, file) in cages.iter().filter(|(_, f)| f.exists()) {
                match rustomnic_queue::admin::cancel(file, &id, std::time::Duration::from_secs(3 * 86_400)) {
                    Ok(said) => {
                        println!("cage {cage}: {said}");
                        return Ok(());
                    }
                    Err(e) if e.starts_with("no call ") => last = e,
                    Err(e) => return Err(format!("cage {cage}: {e}")),
                }
            }
            for c in &clustered_of {
                match rustomnic_queue::admin_cluster::cancel(*c, &id) {
                    Ok(Some(said)) => {
                        println!("cage {}: {said}", c.cage);
                        return Ok(());
                    }
                    Ok(None) => {}
                    // Its errors name the cage (and the queues and servers when NATS is away).
                    Err(e) => return Err(e),
                }
            }
            Err(last)
        }
        QueueCommand::Purge { dead, .. } => {
            for (cage, file) in cages.iter().filter(|(_, f)| f.exists()) {
                let n = rustomnic_queue::admin::purge(file, dead, std::io::IsTerminal::is_terminal(&std::io::stderr()))?;
                println!("cage {cage}: deleted {n} {}", if dead { "dead letters" } else { "calls" });
            }
            for c in &clustered_of {
                rustomnic_queue::admin_cluster::purge(*c, dead, &mut out)?;
            }
            Ok(())
        }
    }
}

/// The files of `pmnc new`: an app with one cage.
const SCAFFOLD: &[(&str, &str)] = &[
    ("cages/web/cage.toml", include_str!("scaffold/cage.toml")),
    ("cages/web/http.lua", include_str!("scaffold/http.lua")),
    ("cages/web/greeting.lua", include_str!("scaffold/greeting.lua")),
    ("cages/web/greeting_test.lua", include_str!("scaffold/greeting_test.lua")),
    // Editor support: lua-language-server reads .luarc.json and the pmnc annotations.
    (".luarc.json", include_str!("scaffold/luarc.json")),
    (".luals/pmnc.lua", include_str!("scaffold/luals/pmnc.lua")),
    // The cages' state files are data, not source.
    (".gitignore", include_str!("scaffold/gitignore")),
];

/// The files of a cage added by `pmnc new --cage NAME`; CAGE in them becomes NAME.
const SCAFFOLD_CAGE: &[(&str, &str)] = &[
    ("cage.toml", include_str!("scaffold/newcage/cage.toml")),
    ("jobs.lua", include_str!("scaffold/newcage/jobs.lua")),
    ("jobs_test.lua", include_str!("scaffold/newcage/jobs_test.lua")),
];

/// Adds the cage `name` to the app at `at` (the app folder, or a folder inside it): writes
/// `cages/NAME`. Returns (the app folder, the new cage folder).
fn scaffold_cage(at: &std::path::Path, name: &str) -> Result<(PathBuf, PathBuf), String> {
    if !rustomnic_core::is_cage_name(name) {
        return Err(format!("{name:?} is not a valid cage name (letters, digits, _ and -, at most 64)"));
    }
    let start = std::fs::canonicalize(at).map_err(|e| format!("{}: {e}", at.display()))?;
    // The app is the nearest folder holding cages/, from `at` upwards: the command works from
    // the app folder, from cages/ and from inside a cage.
    let Some(app) = start.ancestors().find(|d| d.join("cages").is_dir()) else {
        return Err(format!("{} is not inside an app (no folder with cages/ at it or above it); make one with: pmnc new myapp", at.display()));
    };
    let shown = pathdiff(app);
    let dir = app.join("cages").join(name);
    if dir.exists() {
        return Err(format!("{} already exists; give a new cage name", dir.display()));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (rel, text) in SCAFFOLD_CAGE {
        let file = dir.join(rel);
        std::fs::write(&file, text.replace("CAGE", name)).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    let cage = if shown == std::path::Path::new(".") { PathBuf::from("cages").join(name) } else { shown.join("cages").join(name) };
    Ok((shown, cage))
}

/// `path` relative to the current folder when it is inside it ("." for the folder itself).
fn pathdiff(path: &std::path::Path) -> PathBuf {
    match std::env::current_dir().ok().and_then(|cwd| path.strip_prefix(cwd).ok().map(|p| p.to_path_buf())) {
        Some(p) if p.as_os_str().is_empty() => PathBuf::from("."),
        Some(p) => p,
        None => path.to_path_buf(),
    }
}

fn scaffold(path: &std::path::Path) -> Result<(), String> {
    if path.exists() {
        return Err(format!("{} already exists; give a new folder name", path.display()));
    }
    for (rel, text) in SCAFFOLD {
        let file = path.join(rel);
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    let shared = path.join("cages/.shared");
    std::fs::create_dir_all(&shared).map_err(|e| format!("{}: {e}", shared.display()))?;
    Ok(())
}

fn protocols() -> Protocols {
    let mut p = Protocols::new();
    p.add(Arc::new(rustomnic_http::HttpProtocol));
    p.add(Arc::new(rustomnic_schedule::ScheduleProtocol));
    p.add(Arc::new(rustomnic_line::LineProtocol));
    p.add(Arc::new(rustomnic_amqp::AmqpProtocol));
    p.add(Arc::new(rustomnic_mqtt::MqttProtocol));
    p.add(Arc::new(rustomnic_nats::NatsProtocol));
    p.add(Arc::new(rustomnic_stomp::StompProtocol));
    p.add(Arc::new(rustomnic_celery::CeleryProtocol));
    p.add(Arc::new(rustomnic_mail::SmtpProtocol));
    p.add(Arc::new(rustomnic_mail::ImapProtocol));
    p.add(Arc::new(rustomnic_rpc::JsonRpcProtocol));
    p.add(Arc::new(rustomnic_rpc::XmlRpcProtocol));
    p.add(Arc::new(rustomnic_smpp::SmppProtocol));
    p.add(Arc::new(rustomnic_udp::UdpProtocol));
    p.add(Arc::new(rustomnic_file::FileProtocol));
    p.add_resource(Arc::new(rustomnic_resource_postgresql::Postgresql));
    p.add_resource(Arc::new(rustomnic_resource_mysql::Mysql));
    p.add_resource(Arc::new(rustomnic_resource_redis::Redis));
    p.add_resource(Arc::new(rustomnic_resource_http::Http));
    p.add_resource(Arc::new(rustomnic_resource_smtp::Smtp));
    p.add_resource(Arc::new(rustomnic_resource_cmdexec::CmdexecProtocol));
    p.add_resource(Arc::new(rustomnic_resource_file::FileProtocol));
    p.add_resource(Arc::new(rustomnic_resource_state::StateProtocol));
    p.add_resource(Arc::new(rustomnic_resource_amqp::Amqp));
    p.add_resource(Arc::new(rustomnic_resource_mqtt::Mqtt));
    p.add_resource(Arc::new(rustomnic_resource_nats::Nats));
    p.add_resource(Arc::new(rustomnic_resource_stomp::Stomp));
    p.add_resource(Arc::new(rustomnic_resource_celery::Celery));
    p.add_resource(Arc::new(rustomnic_resource_rpc::JsonRpc));
    p.add_resource(Arc::new(rustomnic_resource_rpc::XmlRpc));
    p.add_resource(Arc::new(rustomnic_resource_smpp::Smpp));
    p.add_resource(Arc::new(rustomnic_resource_udp::Udp));
    p
}

/// `level` from --log-level wins, then RUST_LOG, then `fallback` (from the cages' config);
/// `json`: one JSON object per line (logs.rs).
fn init_logs(flag: Option<&str>, fallback: &str, json: bool) {
    let filter = match flag {
        Some(level) => format!("{level},hyper=warn,notify=warn,async_nats=warn"),
        None => std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| format!("{fallback},hyper=warn,notify=warn,async_nats=warn")),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!json && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .event_format(logs::Lines::new(json))
        .init();
}

/// Whether lines are JSON: --log-format wins, else `log_format` of the cages (json when one of
/// them asks for it).
fn json_logs(flag: &Option<String>, path: Option<&std::path::Path>) -> Result<bool, String> {
    if let Some(f) = flag {
        if !logs::FORMATS.contains(&f.as_str()) {
            return Err(format!("--log-format {f:?} is not one of {}", logs::FORMATS.join(", ")));
        }
        return Ok(f == "json");
    }
    let Some(path) = path else { return Ok(false) };
    let cages = rustomnic_cage::find_cages(path).unwrap_or_default();
    Ok(cages.iter().filter_map(|c| rustomnic_cage::load_cage(c, &protocols()).ok()).any(|c| c.log_format.as_deref() == Some("json")))
}

/// The log level: the flag, else the most verbose `log_level` of the cages, else info.
fn level_for(flag: &Option<String>, path: &std::path::Path) -> Result<String, String> {
    if let Some(l) = flag {
        if !rustomnic_cage::config::LOG_LEVELS.contains(&l.as_str()) {
            return Err(format!("--log-level {l:?} is not one of {}", rustomnic_cage::config::LOG_LEVELS.join(", ")));
        }
        return Ok(l.clone());
    }
    let levels = rustomnic_cage::config::LOG_LEVELS;
    let mut best = 2; // info
    if let Ok(cages) = rustomnic_cage::find_cages(path) {
        for c in cages {
            if let Ok(c) = rustomnic_cage::load_cage(&c, &protocols()) {
                if let Some(i) = c.log_level.and_then(|l| levels.iter().position(|x| *x == l)) {
                    best = best.max(i);
                }
            }
        }
    }
    Ok(levels[best].to_string())
}

fn report(e: Error) -> ExitCode {
    match e {
        Error::Invalid(_) => eprintln!("pmnc: refused to start:\n{e}"),
        other => eprintln!("pmnc: {other}"),
    }
    ExitCode::from(1)
}

/// Hands memory the allocator keeps cached back to the system; the Lua host calls it after the
/// full collection that follows a request which left its VM much bigger (a memory bomb).
fn release_memory() {
    #[cfg(feature = "mimalloc")]
    // SAFETY: mi_collect may be called from any thread at any time.
    unsafe {
        libmimalloc_sys::mi_collect(true)
    };
    #[cfg(all(not(feature = "mimalloc"), target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim may be called at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The stack of threads started without a size of their own, unless `RUST_MIN_STACK` says
/// otherwise. lapin parses each AMQP frame on its own I/O thread (which takes this default), and
/// its parser recurses once per level of a header's nesting: the deepest header a 128 KiB frame
/// can carry (about 26,000 levels) needs some 48 MiB in a release build and ten times that in a
/// debug build (decision 114). Address space only: pages are used as they are touched.
const THREAD_STACK: usize = if cfg!(debug_assertions) { 1 << 30 } else { 128 << 20 };

fn main() -> ExitCode {
    // Before any thread starts: the standard library reads it once, at the first spawn.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", THREAD_STACK.to_string());
    }
    rustomnic_lua::set_release_memory(release_memory);
    let cli = Cli::parse();
    match cli.command {
        Command::Cluster { command: ClusterCommand::Status { path, cluster, flock, wait, json } } => {
            init_logs(cli.log_level.as_deref(), "warn", matches!(json_logs(&cli.log_format, None), Ok(true)));
            match cluster_status(path, cluster, flock, &wait, json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pmnc cluster status: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run { path, workers, no_watch, cluster, flock } => {
            match level_for(&cli.log_level, &path).and_then(|l| Ok((l, json_logs(&cli.log_format, Some(&path))?))) {
                Ok((l, json)) => init_logs(cli.log_level.as_deref(), &l, json),
                Err(e) => {
                    eprintln!("pmnc: {e}");
                    return ExitCode::from(2);
                }
            }
            rustomnic_http::tune_process();
            let mut options = RunOptions::default();
            if let Some(w) = workers {
                if w == 0 || w > 1024 {
                    eprintln!("pmnc: --workers must be 1..=1024");
                    return ExitCode::from(2);
                }
                options.workers = w;
            }
            options.watch = !no_watch;
            options.cluster = cluster;
            options.flock = flock;
            match rustomnic_cage::run(&path, &protocols(), options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(e),
            }
        }
        Command::Check { path } => {
            init_logs(cli.log_level.as_deref(), "warn", matches!(json_logs(&cli.log_format, None), Ok(true)));
            match rustomnic_cage::check(&path, &protocols()) {
                Ok(s) => {
                    println!("ok: {} cage(s), {} module(s), {} interface(s)", s.cages, s.modules, s.interfaces);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Test { path, filter } => {
            init_logs(cli.log_level.as_deref(), "warn", matches!(json_logs(&cli.log_format, None), Ok(true)));
            let mut out = std::io::stdout();
            match rustomnic_cage::run_tests(&path, &protocols(), filter.as_deref(), &mut out) {
                Ok(s) if s.failed == 0 => ExitCode::SUCCESS,
                Ok(_) => ExitCode::from(1),
                Err(e) => report(e),
            }
        }
        Command::New { path, cage } => {
            let made = match (cage, path) {
                (Some(name), path) => scaffold_cage(&path.unwrap_or_else(|| PathBuf::from(".")), &name)
                    .map(|(app, dir)| format!("created {}; run the app with: pmnc run {}", dir.display(), app.display())),
                (None, Some(path)) => scaffold(&path).map(|()| format!("created {0}; run it with: pmnc run {0}", path.display())),
                (None, None) => Err("give the folder of the new app (pmnc new myapp), or --cage NAME to add a cage to an app".to_string()),
            };
            match made {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pmnc new: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Health { url, timeout } => {
            let checked = rustomnic_core::parse_duration(&timeout).map_err(|e| format!("--timeout: {e}")).and_then(|t| health::check(&url, t));
            match checked {
                Ok(said) => {
                    println!("{said}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pmnc health: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::RawNats { url, respond, subject, in_flight, count, payload_bytes } => {
            let result = if respond {
                rustomnic_cluster::bench::respond(&url, &subject)
            } else {
                rustomnic_cluster::bench::request(&url, &subject, in_flight, count, &vec![b'x'; payload_bytes]).map(|f| {
                    println!(
                        "{}",
                        serde_json::json!({"calls": f.calls, "seconds": f.seconds, "p50_us": f.p50_us, "p99_us": f.p99_us, "calls_per_s": f.calls as f64 / f.seconds})
                    );
                })
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pmnc raw-nats: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Queue { command } => {
            init_logs(cli.log_level.as_deref(), "warn", matches!(json_logs(&cli.log_format, None), Ok(true)));
            match queue_command(command) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pmnc queue: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::RawHttp { listen, workers } => match rustomnic_http::raw::serve(listen, workers) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pmnc: {e}");
                ExitCode::from(1)
            }
        },
    }
}
