//! The `pmnc` command: thin glue from the command line to the cage runtime.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use rustomnic_cage::{Error, Protocols, RunOptions};

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
  pmnc new myapp                          make an app with one cage to start from";

#[derive(Parser)]
#[command(name = "pmnc", version, about = "Rustomnic: run cages of hot-reloaded Lua modules behind interfaces.", after_help = EXAMPLES)]
struct Cli {
    /// error, warn, info, debug or trace; wins over RUST_LOG and log_level in cage.toml.
    #[arg(long, global = true)]
    log_level: Option<String>,
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
    /// Make a new app folder with one cage (web) to start from.
    New {
        /// The folder to create; it must not exist.
        path: PathBuf,
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

/// The files of `pmnc new`: an app with one cage.
const SCAFFOLD: &[(&str, &str)] = &[
    ("cages/web/cage.toml", include_str!("scaffold/cage.toml")),
    ("cages/web/http.lua", include_str!("scaffold/http.lua")),
    ("cages/web/greeting.lua", include_str!("scaffold/greeting.lua")),
    ("cages/web/greeting_test.lua", include_str!("scaffold/greeting_test.lua")),
];

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
    p.add_resource(Arc::new(rustomnic_resource_postgresql::Postgresql));
    p.add_resource(Arc::new(rustomnic_resource_mysql::Mysql));
    p.add_resource(Arc::new(rustomnic_resource_redis::Redis));
    p.add_resource(Arc::new(rustomnic_resource_http::Http));
    p.add_resource(Arc::new(rustomnic_resource_smtp::Smtp));
    p.add_resource(Arc::new(rustomnic_resource_cmdexec::CmdexecProtocol));
    p.add_resource(Arc::new(rustomnic_resource_file::FileProtocol));
    p.add_resource(Arc::new(rustomnic_resource_state::StateProtocol));
    p
}

/// `level` from --log-level wins, then RUST_LOG, then `fallback` (from the cages' config).
fn init_logs(flag: Option<&str>, fallback: &str) {
    let filter = match flag {
        Some(level) => format!("{level},hyper=warn,notify=warn"),
        None => std::env::var("RUST_LOG")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("{fallback},hyper=warn,notify=warn")),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { path, workers, no_watch } => {
            match level_for(&cli.log_level, &path) {
                Ok(l) => init_logs(cli.log_level.as_deref(), &l),
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
            match rustomnic_cage::run(&path, &protocols(), options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(e),
            }
        }
        Command::Check { path } => {
            init_logs(cli.log_level.as_deref(), "warn");
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
            init_logs(cli.log_level.as_deref(), "warn");
            let mut out = std::io::stdout();
            match rustomnic_cage::run_tests(&path, &protocols(), filter.as_deref(), &mut out) {
                Ok(s) if s.failed == 0 => ExitCode::SUCCESS,
                Ok(_) => ExitCode::from(1),
                Err(e) => report(e),
            }
        }
        Command::New { path } => match scaffold(&path) {
            Ok(()) => {
                println!("created {0}; run it with: pmnc run {0}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pmnc new: {e}");
                ExitCode::from(1)
            }
        },
        Command::RawHttp { listen, workers } => match rustomnic_http::raw::serve(listen, workers) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pmnc: {e}");
                ExitCode::from(1)
            }
        },
    }
}
