//! The Lua host of Rustomnic: one VM per cage per worker thread, modules, and requests as
//! coroutines under deadlines. See ARCHITECTURE.md for the invariants this crate keeps.

pub mod convert;
pub mod metrics;
pub mod events;
mod events_lua;
pub mod durable;
pub mod module;
pub mod request;
pub mod transaction;
pub mod vm;
pub mod worker;

pub use module::{compile, CompiledModule, Module, ModuleError};
pub use request::{new_request_id, RequestCtx, RequestFuture, RunError};
pub use vm::CageVm;
pub use transaction::{Participant, ParticipantError, Prepared, Resources};
pub use worker::{CallError, CallRequest, Transport};
pub use mlua;
pub use events_lua::{current_request, seconds as events_seconds, wake_request_at};
