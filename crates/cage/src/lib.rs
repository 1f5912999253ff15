//! The cage runtime of Rustomnic: finding cages, reading their config, loading their modules,
//! running them on worker threads behind their interfaces, reloading changed modules, and
//! running module tests.

pub mod app;
pub mod config;
pub mod error;
pub mod interface;
mod live;
pub mod modules;
mod monitor;
pub mod notify;
pub mod runtime;
pub mod testing;
mod watcher;

pub use app::{find_cages, CageDir};
pub use config::{load_cage, CageConfig};
pub use error::Error;
pub use interface::Protocols;
pub use runtime::{check, prepare, run, CheckSummary, RunOptions};
pub use rustomnic_interface::{Interface, InterfaceProtocol, InterfaceSpec, Shutdown};
pub use testing::{run_tests, TestSummary};
