//! Route tables: a module's table of `"METHOD /path/{param}"` keys to handler functions, compiled
//! once per module version and VM into a trie of path segments, matched per request.
//!
//! A segment trie rather than a list of patterns: a request walks one node per path segment
//! whatever the number of routes, so 200 routes cost what 2 do. Static segments win over a
//! parameter, which wins over a catch-all, with backtracking when a longer match fails deeper.

use std::borrow::Cow;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use rustomnic_core::metrics::{self, StatusCounts};
use rustomnic_lua::mlua::{Function, Lua, LuaString, Table, Value as LuaValue};

use crate::handler::percent_decode;

/// The most routes one table may hold, and the longest pattern: limits on module input too.
const MAX_ROUTES: usize = 10_000;
const MAX_PATTERN: usize = 2048;

/// A compiled route table. Handlers are Lua functions kept beside it (see [`Routers`]); here
/// they are indexes into that list.
pub(crate) struct Router {
    root: Node,
    routes: Vec<Route>,
}

/// One route: its key as written (`GET /orders/{id}`), which labels its metrics and reaches
/// Lua as `request.route`, and its status counts.
pub(crate) struct Route {
    pub(crate) key: Box<str>,
    pub(crate) counts: Arc<StatusCounts>,
}

// FNV-1a (rustomnic_core::fnv): segments are short, and the keys come from the route table
// (the module's author), not from clients. Also the hash of the requests' slots (stream.rs),
// whose keys are request ids this process made.
type Statics = HashMap<Box<[u8]>, Node, rustomnic_core::fnv::FnvBuild>;

#[derive(Default)]
struct Node {
    statics: Statics,
    param: Option<(Box<str>, Box<Node>)>,
    rest: Option<(Box<str>, Methods)>,
    methods: Methods,
}

/// The handlers of one path, by method; `any` serves the methods not listed.
#[derive(Default)]
struct Methods {
    by_method: Vec<(Box<str>, usize)>,
    any: Option<usize>,
}

impl Methods {
    fn is_empty(&self) -> bool {
        self.by_method.is_empty() && self.any.is_none()
    }

    /// The route for `method`: its own, GET's for HEAD, or the any-method one.
    fn find(&self, method: &str) -> Option<usize> {
        let own = |m: &str| self.by_method.iter().find(|(k, _)| &**k == m).map(|(_, i)| *i);
        own(method).or_else(|| if method == "HEAD" { own("GET") } else { None }).or(self.any)
    }

    /// The `allow` header of a 405.
    fn allow(&self) -> String {
        let mut names: Vec<&str> = self.by_method.iter().map(|(m, _)| &**m).collect();
        if names.contains(&"GET") && !names.contains(&"HEAD") {
            names.push("HEAD");
        }
        names.sort_unstable();
        names.join(", ")
    }

    fn add(&mut self, method: Option<&str>, index: usize, key: &str, keys: &[Route]) -> Result<(), String> {
        let taken = match method {
            None => self.any.replace(index),
            Some(m) => match self.by_method.iter_mut().find(|(k, _)| &**k == m) {
                Some((_, i)) => Some(std::mem::replace(i, index)),
                None => {
                    self.by_method.push((m.into(), index));
                    None
                }
            },
        };
        match taken {
            Some(other) => Err(format!("routes {:?} and {key:?} match the same requests", keys[other].key)),
            None => Ok(()),
        }
    }
}

/// A path parameter: its name, and its value decoded (borrowed from the path when it had
/// nothing to decode).
pub(crate) type Param<'r, 'p> = (&'r str, Cow<'p, [u8]>);

/// What a request's method and path found.
pub(crate) enum Found<'r, 'p> {
    /// The route's index and the path's parameters.
    Route(usize, Vec<Param<'r, 'p>>),
    /// The path has routes, none for this method: the `allow` header.
    WrongMethod(String),
    Nothing,
}

impl Router {
    /// Compiles `table`; the handlers come back in route order, for the caller to keep beside
    /// the router. Errors name the key at fault.
    pub(crate) fn compile(table: &Table, cage: &str, interface: &str) -> Result<(Router, Vec<Function>), String> {
        let mut router = Router { root: Node::default(), routes: Vec::new() };
        let mut handlers = Vec::new();
        // Sorted, so that which of two conflicting keys an error names does not depend on the
        // table's order.
        let mut entries = Vec::new();
        for pair in table.pairs::<LuaValue, LuaValue>() {
            let (k, v) = pair.map_err(|e| e.to_string())?;
            let LuaValue::String(k) = k else {
                return Err(format!("a route's key must be a string such as \"GET /orders/{{id}}\", got {}", k.type_name()));
            };
            let key = k.to_str().map_err(|_| "a route's key is not UTF-8".to_string())?.to_string();
            let LuaValue::Function(f) = v else {
                return Err(format!("route {key:?}: its value must be a function, got {}", v.type_name()));
            };
            entries.push((key, f));
            if entries.len() > MAX_ROUTES {
                return Err(format!("more than {MAX_ROUTES} routes"));
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, f) in entries {
            let (method, pattern) = split_key(&key)?;
            let index = router.routes.len();
            router.add(method, pattern, index, &key)?;
            let counts = metrics::status_counts(cage, interface, &key);
            router.routes.push(Route { key: key.into(), counts });
            handlers.push(f);
        }
        Ok((router, handlers))
    }

    fn add(&mut self, method: Option<&str>, pattern: &str, index: usize, key: &str) -> Result<(), String> {
        let segments = split_path(pattern);
        let Router { root, routes } = self;
        let mut node = root;
        let mut iter = segments.iter().peekable();
        while let Some(seg) = iter.next() {
            if let Some(inner) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if let Some(name) = inner.strip_prefix('*') {
                    check_name(name, key)?;
                    if iter.peek().is_some() {
                        return Err(format!("route {key:?}: a catch-all {{*{name}}} must be the last segment"));
                    }
                    let (existing, methods) = node.rest.get_or_insert_with(|| (name.into(), Methods::default()));
                    if &**existing != name {
                        return Err(format!("route {key:?}: catch-all {{*{name}}} where another route names it {{*{existing}}}"));
                    }
                    return methods.add(method, index, key, routes);
                }
                check_name(inner, key)?;
                let (existing, child) = node.param.get_or_insert_with(|| (inner.into(), Box::default()));
                if &**existing != inner {
                    return Err(format!("route {key:?}: parameter {{{inner}}} where another route names it {{{existing}}}"));
                }
                node = child;
            } else {
                if seg.contains(['{', '}']) {
                    return Err(format!("route {key:?}: a parameter takes a whole segment, as in /orders/{{id}}"));
                }
                node = node.statics.entry(seg.as_bytes().into()).or_default();
            }
        }
        node.methods.add(method, index, key, routes)
    }

    pub(crate) fn route(&self, index: usize) -> Option<&Route> {
        self.routes.get(index)
    }

    /// Finds the route of a request: `path` is the raw (percent-encoded) path.
    pub(crate) fn find<'p>(&self, method: &str, path: &'p str) -> Found<'_, 'p> {
        let mut params = Vec::new();
        let mut wrong = None;
        match walk(&self.root, segments(path), method, &mut params, &mut wrong) {
            Some(index) => Found::Route(index, params),
            None => match wrong {
                Some(allow) => Found::WrongMethod(allow),
                None => Found::Nothing,
            },
        }
    }
}

/// The path without its leading and trailing slash, or None when it has no segment: what
/// [`walk`] takes segment by segment, without collecting them.
fn segments(path: &str) -> Option<&str> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    (!trimmed.is_empty()).then_some(trimmed)
}

fn decode(segment: &str) -> Cow<'_, [u8]> {
    // Most segments have nothing encoded: then nothing is copied.
    if segment.as_bytes().contains(&b'%') {
        percent_decode(segment).into()
    } else {
        segment.as_bytes().into()
    }
}

/// Depth-first over `rest` (the segments still to match, "a/b/c"): static child, then
/// parameter, then catch-all. `wrong` keeps the first path that matched without a route for the
/// method.
fn walk<'r, 'p>(node: &'r Node, rest: Option<&'p str>, method: &str, params: &mut Vec<Param<'r, 'p>>, wrong: &mut Option<String>) -> Option<usize> {
    let Some(segments) = rest else {
        return match node.methods.find(method) {
            Some(i) => Some(i),
            None => {
                if !node.methods.is_empty() && wrong.is_none() {
                    *wrong = Some(node.methods.allow());
                }
                // "/files/" with a catch-all "/files/{*path}": an empty rest.
                catch_all(node, "", method, params, wrong)
            }
        };
    };
    // Segments are short: a plain scan beats memchr's set-up.
    let (first, more) = match segments.bytes().position(|b| b == b'/') {
        Some(i) => (&segments[..i], Some(&segments[i + 1..])),
        None => (segments, None),
    };
    let decoded = decode(first);
    if let Some(child) = node.statics.get(&*decoded) {
        if let Some(i) = walk(child, more, method, params, wrong) {
            return Some(i);
        }
    }
    if let Some((name, child)) = &node.param {
        params.push((&**name, decoded));
        if let Some(i) = walk(child, more, method, params, wrong) {
            return Some(i);
        }
        params.pop();
    }
    catch_all(node, segments, method, params, wrong)
}

fn catch_all<'r, 'p>(node: &'r Node, segments: &'p str, method: &str, params: &mut Vec<Param<'r, 'p>>, wrong: &mut Option<String>) -> Option<usize> {
    let (name, methods) = node.rest.as_ref()?;
    match methods.find(method) {
        Some(i) => {
            params.push((&**name, decode(segments)));
            Some(i)
        }
        None => {
            if wrong.is_none() {
                *wrong = Some(methods.allow());
            }
            None
        }
    }
}

/// `"GET /orders"` into its method (None for `*` or no method) and pattern.
fn split_key(key: &str) -> Result<(Option<&str>, &str), String> {
    let (method, pattern) = match key.split_once(' ') {
        Some((m, p)) => (Some(m), p.trim_start()),
        None => (None, key),
    };
    let method = match method {
        Some("*") | None => None,
        Some(m) if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => Some(m),
        Some(m) => return Err(format!("route {key:?}: {m:?} is not a method (write it in capitals, as GET, or * for any)")),
    };
    if !pattern.starts_with('/') {
        return Err(format!("route {key:?}: the path must start with /"));
    }
    if pattern.len() > MAX_PATTERN {
        return Err(format!("route {:?}...: longer than {MAX_PATTERN} bytes", &key[..32.min(key.len())]));
    }
    if pattern.contains("//") {
        return Err(format!("route {key:?}: an empty segment (//)"));
    }
    if pattern.contains(['?', '#', ' ']) {
        return Err(format!("route {key:?}: a path pattern has no query, fragment or spaces"));
    }
    Ok((method, pattern))
}

fn check_name(name: &str, key: &str) -> Result<(), String> {
    let ok = name.bytes().enumerate().all(|(i, b)| b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()));
    if ok && !name.is_empty() {
        Ok(())
    } else {
        Err(format!("route {key:?}: {name:?} is not a parameter name (letters, digits and _, not starting with a digit)"))
    }
}

/// The segments of a path; a trailing slash does not count, so "/orders/" is "/orders".
fn split_path(path: &str) -> Vec<&str> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    if trimmed.is_empty() {
        Vec::new()
    } else {
        trimmed.split('/').collect()
    }
}

/// A route table compiled for one VM: the router, and per route its handler and its key as a
/// Lua string (for `request.route`). mlua handles are reference-counted on the Rust side, so
/// handing them to a request copies nothing and calls nothing in Lua.
pub(crate) struct Compiled {
    pub(crate) router: Router,
    handlers: Vec<Function>,
    keys: Vec<LuaString>,
}

impl Compiled {
    /// The handler and key of route `index`.
    pub(crate) fn route_values(&self, index: usize) -> Option<(Function, LuaString)> {
        Some((self.handlers.get(index)?.clone(), self.keys.get(index)?.clone()))
    }
}

/// One interface's route table as last seen on this VM: the table (held, so that its address
/// cannot be taken by another table while it is compared), its address, and what compiling it
/// gave; a compile error is kept too, so that it is reported once per version.
struct Slot {
    interface: Box<str>,
    address: *const std::ffi::c_void,
    _table: Table,
    compiled: Result<Rc<Compiled>, Rc<str>>,
}

/// The route tables of one VM, one slot per interface that has one, in the VM's app data: a
/// request finds its compiled table by comparing one address, without a call into Lua. A
/// module's new version brings a new table (a new address): it is compiled on its first request
/// and replaces the old one in the slot, which lets the old version go.
#[derive(Default)]
struct Cache(Vec<Slot>);

/// Finds or compiles the route table `table` of `interface` for this VM. Errors name the key at
/// fault.
pub(crate) fn compiled(lua: &Lua, table: &Table, cage: &str, interface: &str) -> Result<Rc<Compiled>, Rc<str>> {
    let address = table.to_pointer();
    if let Some(cache) = lua.app_data_ref::<Cache>() {
        if let Some(slot) = cache.0.iter().find(|s| &*s.interface == interface) {
            if slot.address == address {
                return slot.compiled.clone();
            }
        }
    }
    let compiled = compile_values(lua, table, cage, interface).map(Rc::new).map_err(Rc::<str>::from);
    let slot = Slot { interface: interface.into(), address, _table: table.clone(), compiled: compiled.clone() };
    if lua.app_data_ref::<Cache>().is_none() {
        lua.set_app_data(Cache::default());
    }
    if let Some(mut cache) = lua.app_data_mut::<Cache>() {
        cache.0.retain(|s| &*s.interface != interface);
        cache.0.push(slot);
    }
    compiled
}

fn compile_values(lua: &Lua, table: &Table, cage: &str, interface: &str) -> Result<Compiled, String> {
    let (router, handlers) = Router::compile(table, cage, interface)?;
    let keys = router.routes.iter().map(|r| lua.create_string(&*r.key)).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    Ok(Compiled { router, handlers, keys })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(keys: &[&str]) -> Result<Router, String> {
        let lua = Lua::new();
        let t = lua.create_table().map_err(|e| e.to_string())?;
        for k in keys {
            let f = lua.create_function(|_, ()| Ok(())).map_err(|e| e.to_string())?;
            t.raw_set(*k, f).map_err(|e| e.to_string())?;
        }
        Router::compile(&t, "test", "http").map(|(r, _)| r)
    }

    fn found(r: &Router, method: &str, path: &str) -> String {
        match r.find(method, path) {
            Found::Route(i, params) => {
                let params: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v))).collect();
                format!("{} {}", r.routes[i].key, params.join(","))
            }
            Found::WrongMethod(allow) => format!("405 {allow}"),
            Found::Nothing => "404".into(),
        }
    }

    #[test]
    fn static_param_and_catch_all_routes_match_in_that_order() {
        let r = router(&["GET /orders/{id}", "GET /orders/new", "POST /orders", "GET /files/{*path}", "* /any", "GET /"]).unwrap();
        assert_eq!(found(&r, "GET", "/orders/42"), "GET /orders/{id} id=42");
        assert_eq!(found(&r, "GET", "/orders/new"), "GET /orders/new ");
        assert_eq!(found(&r, "GET", "/orders/a%20b/"), "GET /orders/{id} id=a b");
        assert_eq!(found(&r, "POST", "/orders"), "POST /orders ");
        assert_eq!(found(&r, "GET", "/orders"), "405 POST");
        assert_eq!(found(&r, "DELETE", "/orders/1"), "405 GET, HEAD");
        assert_eq!(found(&r, "HEAD", "/orders/1"), "GET /orders/{id} id=1");
        assert_eq!(found(&r, "GET", "/files/a/b%2Fc.txt"), "GET /files/{*path} path=a/b/c.txt");
        assert_eq!(found(&r, "GET", "/files/"), "GET /files/{*path} path=");
        assert_eq!(found(&r, "PATCH", "/any"), "* /any ");
        assert_eq!(found(&r, "GET", "/"), "GET / ");
        assert_eq!(found(&r, "GET", "/nothing/here"), "404");
        assert_eq!(found(&r, "GET", "/orders/1/2"), "404");
    }

    #[test]
    fn a_static_dead_end_backtracks_to_the_parameter() {
        let r = router(&["GET /a/b", "GET /a/{x}/c"]).unwrap();
        assert_eq!(found(&r, "GET", "/a/b/c"), "GET /a/{x}/c x=b");
    }

    #[test]
    fn bad_route_tables_are_refused_naming_the_key() {
        let bad = [
            (vec!["GET orders"], "must start with /"),
            (vec!["get /x"], "is not a method"),
            (vec!["GET /x/{id}", "GET /x/{name}"], "another route names it"),
            (vec!["GET /x/{*a}/b"], "must be the last segment"),
            (vec!["GET /x/v{n}"], "takes a whole segment"),
            (vec!["GET /x/{1a}"], "is not a parameter name"),
            (vec!["GET /x", "GET /x/"], "match the same requests"),
            (vec!["GET /a//b"], "empty segment"),
            (vec!["GET /a?b=1"], "no query"),
        ];
        for (keys, want) in bad {
            match router(&keys) {
                Ok(_) => panic!("{keys:?} compiled"),
                Err(e) => assert!(e.contains(want), "{keys:?}: {e}"),
            }
        }
    }

    #[test]
    fn two_hundred_routes_find_each_their_own() {
        let keys: Vec<String> = (0..200).map(|i| format!("GET /r{i}/{{id}}/items")).collect();
        let refs: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
        let r = router(&refs).unwrap();
        for i in 0..200 {
            assert_eq!(found(&r, "GET", &format!("/r{i}/7/items")), format!("GET /r{i}/{{id}}/items id=7"));
        }
    }
}
