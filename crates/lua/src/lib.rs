//! The Lua host of Rustomnic: one VM per cage per worker thread, modules, and requests as
//! coroutines under deadlines. See ARCHITECTURE.md for the invariants this crate keeps.

mod api;
pub mod convert;
pub mod durable;
pub mod events;
mod events_lua;
pub mod libraries;
pub mod limits;
pub mod metrics;
pub mod module;
pub mod pattern;
pub mod request;
mod strings;
pub mod trace;
pub mod transaction;
pub mod vm;
pub mod watchdog;
pub mod worker;
mod workflow;

pub use events_lua::{current_request, seconds as events_seconds, wake_request_at};
pub use limits::LuaLimits;
pub use mlua;
pub use module::{compile, CompiledModule, Module, ModuleError};
pub use request::set_release_memory;
pub use request::{new_request_id, RequestCtx, RequestFuture, RunError};
pub use transaction::{Participant, ParticipantError, Prepared, Resources};
pub use vm::CageVm;
pub use worker::{CallError, CallRequest, Transport};
