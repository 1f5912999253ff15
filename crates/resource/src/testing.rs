//! Test support for resource protocols: run a Lua module function of a cage whose resources
//! are given, on a current-thread runtime, as a request with a deadline.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rustomnic_core::{Section, SourceFile, Value};
use rustomnic_lua::{compile, worker, CageVm, CompiledModule, RequestCtx, RunError};

use crate::{read_pool_settings, ResourceProtocol, ResourceConfig};

/// Configures a resource from TOML text of its table (`url = "..."` ...), as `cage.toml` would.
/// Returns the problems found, each as `file:line: key: message`.
pub fn configure(protocol: &dyn ResourceProtocol, name: &str, toml: &str) -> Result<ResourceConfig, Vec<String>> {
    configure_in(Path::new(""), protocol, name, toml)
}

/// Like [`configure`], as the `cage.toml` of the cage folder `dir`, for keys whose relative paths
/// are taken from that folder.
pub fn configure_in(dir: &Path, protocol: &dyn ResourceProtocol, name: &str, toml: &str) -> Result<ResourceConfig, Vec<String>> {
    let text = format!("[resources.{name}]\n{toml}");
    let file = SourceFile::parse(&dir.join("cage.toml"), text).map_err(|e| vec![e.to_string()])?;
    let root = file.root();
    let config = (|| {
        let resources: Section = root.table("resources")?;
        let section = resources.table(name)?;
        let _ = section.string("protocol");
        let mut pool = read_pool_settings(&section, 0);
        let resource = protocol.configure(name, &section);
        section.finish();
        let resource = resource?;
        if pool.size == 0 {
            pool.size = resource.default_pool_size();
        }
        Some(ResourceConfig { name: name.to_string(), protocol: protocol.name().to_string(), pool, resource, fingerprint: section.fingerprint() })
    })();
    let errors = file.take_errors();
    match config {
        Some(c) if errors.is_empty() => Ok(c),
        _ => Err(errors.iter().map(|e| e.to_string()).collect()),
    }
}

/// Runs `function` of a module with `source` in cage "test" having `resources`, with `timeout`
/// as the request's deadline. Each call builds a fresh runtime, VM and pools.
pub fn run_lua(resources: Vec<ResourceConfig>, source: &str, function: &str, args: Vec<Value>, timeout: Duration) -> Result<Vec<Value>, RunError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| RunError::Internal(e.to_string()))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let stats = resources.iter().map(|r| (("test".to_string(), r.name.clone()), crate::stats_for("test", &r.name))).collect::<BTreeMap<_, _>>();
        let _pools = crate::install(&[("test".to_string(), resources)], 1, &stats);
        let vm = CageVm::new("test").map_err(RunError::Internal)?;
        let display = "test/m.lua".to_string();
        let bytecode = compile("m", Path::new(&display), &display, source.as_bytes()).map_err(|e| RunError::Internal(e.to_string()))?;
        let module = CompiledModule { name: "m".into(), path: display.clone().into(), display, bytecode, functions: vec![], version: 1, source_hash: 0 };
        vm.install(&module).map_err(RunError::Internal)?;
        let result = vm.call(RequestCtx::new("test", "test", timeout), "m", function, args).await;
        worker::clear();
        result
    })
}
