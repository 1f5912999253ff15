//! Time-based preemption. The instruction hook counts VM instructions, and a few instructions
//! can each take milliseconds (comparing or joining strings of many megabytes): counting alone
//! would let such a loop hold its worker for seconds. Every thread that runs Lua marks when it
//! entered Lua; a watchdog thread that sees one stay in Lua past its time slice sends that thread
//! a signal, whose handler makes the running coroutine's hook fire at its very next instruction.
//!
//! The handler does not call `lua_sethook` (Lua calls it signal-safe, but it walks the list of
//! call frames, and a signal that lands while a frame is being pushed makes it write into a C
//! frame: that was seen here to lose wake-ups). Since every VM runs a count hook, every Lua frame
//! already traps on each instruction and counts down `hookcount`; the handler only sets that
//! counter to 1, one aligned int store on the interrupted thread itself. The counter's place in
//! `lua_State` is not public, so it is found once per process by setting a distinctive count on
//! a fresh thread and looking for it (see [`calibrate`]); if that fails, arming is off and the
//! count hook alone slices.
//!
//! The watchdog also reports a thread that stays in one Lua section for a second or more: that
//! is a long C call (a built-in over a huge input) that no hook can interrupt.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mlua::ffi;

/// A thread in Lua this long past its entry is signalled (the hook normally yields at 1 ms).
const SIGNAL_AFTER: Duration = Duration::from_micros(50);
/// How often the watchdog looks while some thread has been in Lua past [`SIGNAL_AFTER`]: it
/// signals that thread again at each look until the hook has ended its slice.
const TICK: Duration = Duration::from_micros(100);
/// How often it looks while threads ran Lua recently but none was caught in a long section.
/// Ordinary sections last microseconds; looking every 100 µs for them cost a busy process about a
/// tenth of its CPU in wake-ups (10,000 a second) to catch what a look per millisecond (the
/// length of a time slice) catches as well, one slice later at worst.
const BUSY_TICK: Duration = Duration::from_millis(1);
/// How often it looks when every thread has been idle for a while.
const IDLE_TICK: Duration = Duration::from_millis(20);
/// A thread in one Lua section this long is reported in the log.
const REPORT_AFTER: Duration = Duration::from_secs(1);

struct Slot {
    thread: libc::pthread_t,
    name: String,
    /// Nanoseconds since [`epoch`] when the thread entered Lua; 0 while it is not in Lua.
    since: AtomicU64,
    signalled: AtomicU64,
    reported: AtomicBool,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos(t: Instant) -> u64 {
    // Never 0, which means "not in Lua".
    (t.saturating_duration_since(epoch()).as_nanos() as u64).max(1)
}

static SLOTS: Mutex<Vec<Arc<Slot>>> = Mutex::new(Vec::new());

thread_local! {
    static SLOT: std::cell::OnceCell<Registration> = const { std::cell::OnceCell::new() };
    /// The coroutine running Lua on this thread, read by the signal handler (a plain
    /// thread-local cell with a constant initialiser: no lazy set-up, safe in a handler).
    static RUNNING: Cell<*mut ffi::lua_State> = const { Cell::new(std::ptr::null_mut()) };
    /// Nesting of Lua sections on this thread (Lua calling Rust calling Lua).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// A thread's slot in [`SLOTS`], given up when the thread ends (so no signal is ever sent to a
/// thread id that may have been reused).
struct Registration(Arc<Slot>);

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut slots) = SLOTS.lock() {
            slots.retain(|s| !Arc::ptr_eq(s, &self.0));
        }
    }
}

fn with_slot<R>(f: impl FnOnce(&Slot) -> R) -> R {
    SLOT.with(|s| {
        let registration = s.get_or_init(|| {
            start();
            let slot = Arc::new(Slot {
                // SAFETY: pthread_self has no preconditions.
                thread: unsafe { libc::pthread_self() },
                name: std::thread::current().name().unwrap_or("unnamed").to_string(),
                since: AtomicU64::new(0),
                signalled: AtomicU64::new(0),
                reported: AtomicBool::new(false),
            });
            if let Ok(mut slots) = SLOTS.lock() {
                slots.push(slot.clone());
            }
            Registration(slot)
        });
        f(&registration.0)
    })
}

/// While alive, this thread counts as running Lua in `state` (see the module docs).
pub struct Section {
    previous: *mut ffi::lua_State,
    outermost: bool,
}

/// Marks this thread as running Lua code of `state` from `now`.
pub fn enter(state: *mut ffi::lua_State, now: Instant) -> Section {
    let depth = DEPTH.with(|d| {
        let v = d.get();
        d.set(v + 1);
        v
    });
    if depth == 0 {
        with_slot(|slot| {
            slot.since.store(nanos(now), Ordering::Relaxed);
            slot.reported.store(false, Ordering::Relaxed);
        });
    }
    let previous = RUNNING.with(|r| r.replace(state));
    Section { previous, outermost: depth == 0 }
}

impl Drop for Section {
    fn drop(&mut self) {
        RUNNING.with(|r| r.set(self.previous));
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        if self.outermost {
            with_slot(|slot| slot.since.store(0, Ordering::Relaxed));
        }
    }
}

/// The coroutine now running Lua on this thread changes to `state` (module code resumed one of
/// its own coroutines); returns the one before, to be given back to [`switch`] afterwards.
pub fn switch(state: *mut ffi::lua_State) -> *mut ffi::lua_State {
    RUNNING.with(|r| r.replace(state))
}

/// Byte offset of `hookcount` in `lua_State`: 0 while unknown, `usize::MAX` if not found.
static HOOKCOUNT_AT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// How far into a `lua_State` the search looks (the struct is about 200 bytes on 64-bit).
const SEARCH_BYTES: usize = 240;

/// Finds where `lua_State` keeps `hookcount`, on a fresh thread of `lua` that has never run.
pub fn calibrate(lua: &mlua::Lua) {
    if HOOKCOUNT_AT.load(Ordering::Relaxed) != 0 {
        return;
    }
    let found = (|| {
        let f = lua.create_function(|_, ()| Ok(())).ok()?;
        let thread = lua.create_thread(f).ok()?;
        let state = thread.state();
        // SAFETY: the thread is new and never runs while we look; lua_sethook on a thread that is
        // not running walks only its base frame. Reads stay within the struct: they stop at the
        // first match, which lies inside it.
        unsafe {
            let hook = ffi::lua_gethook(state);
            let mask = ffi::lua_gethookmask(state);
            let count = ffi::lua_gethookcount(state);
            let probe = |value: i32| -> Option<usize> {
                ffi::lua_sethook(state, hook.or(Some(noop_hook)), ffi::LUA_MASKCOUNT, value);
                let base = state as *const u8;
                (0..SEARCH_BYTES / 4).map(|i| i * 4).find(|&at| {
                    let a = std::ptr::read_unaligned(base.add(at) as *const i32);
                    let b = std::ptr::read_unaligned(base.add(at + 4) as *const i32);
                    a == value && b == value
                })
            };
            let first = probe(0x5EED_1234);
            let second = probe(0x2BAD_C0DE);
            ffi::lua_sethook(state, hook, mask, count);
            // basehookcount, then hookcount right after it.
            match (first, second) {
                (Some(a), Some(b)) if a == b => Some(a + 4),
                _ => None,
            }
        }
    })();
    match found {
        Some(at) => HOOKCOUNT_AT.store(at, Ordering::Relaxed),
        None => {
            HOOKCOUNT_AT.store(usize::MAX, Ordering::Relaxed);
            tracing::warn!("cannot find the hook counter in this Lua build; slow single instructions are sliced by the count hook only");
        }
    }
}

unsafe extern "C-unwind" fn noop_hook(_: *mut ffi::lua_State, _: *mut ffi::lua_Debug) {}

/// Whether [`arm`] works in this build (the hook counter was found).
pub fn can_arm() -> bool {
    !matches!(HOOKCOUNT_AT.load(Ordering::Relaxed), 0 | usize::MAX)
}

/// Makes the count hook of `state` fire at its next instruction.
///
/// # Safety
/// `state` must be a live Lua thread of a VM that has the count hook installed, on this thread.
pub unsafe fn arm(state: *mut ffi::lua_State) {
    let at = HOOKCOUNT_AT.load(Ordering::Relaxed);
    if at == 0 || at == usize::MAX {
        return;
    }
    if ffi::lua_gethookmask(state) & ffi::LUA_MASKCOUNT != 0 {
        std::ptr::write_volatile((state as *mut u8).add(at) as *mut i32, 1);
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    let state = RUNNING.with(|r| r.get());
    if !state.is_null() {
        // SAFETY: RUNNING is set only while its thread runs Lua in that state, and the handler
        // runs on that same thread.
        unsafe { arm(state) }
    }
}

/// Starts the watchdog thread and installs the signal handler, once per process.
fn start() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        // SAFETY: a plain handler that only reads a thread-local cell and calls lua_sethook.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGURG, &action, std::ptr::null_mut());
        }
        let _ = std::thread::Builder::new().name("pmnc-watchdog".into()).spawn(watch);
    });
}

fn watch() {
    let mut idle_since = Instant::now();
    let mut long_section = false;
    loop {
        let pause = if long_section {
            TICK
        } else if idle_since.elapsed() < Duration::from_secs(1) {
            BUSY_TICK
        } else {
            IDLE_TICK
        };
        std::thread::sleep(pause);
        long_section = false;
        let now = Instant::now();
        let now_ns = nanos(now);
        // Held while signalling, so no thread can end (and free its id) in between.
        let Ok(slots) = SLOTS.lock() else { return };
        for slot in slots.iter() {
            let since = slot.since.load(Ordering::Relaxed);
            if since == 0 {
                continue;
            }
            idle_since = now;
            let ran = Duration::from_nanos(now_ns.saturating_sub(since));
            long_section |= ran >= SIGNAL_AFTER;
            if ran >= SIGNAL_AFTER && now_ns.saturating_sub(slot.signalled.load(Ordering::Relaxed)) >= TICK.as_nanos() as u64 {
                slot.signalled.store(now_ns, Ordering::Relaxed);
                // SAFETY: the slot is in SLOTS, so its thread has not ended (it removes its slot
                // when it does, before its id can be reused).
                unsafe {
                    libc::pthread_kill(slot.thread, libc::SIGURG);
                }
            }
            if ran >= REPORT_AFTER && !slot.reported.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "thread {} has run Lua for {:.1} s without returning to its event loop: a long call of C or Rust code \
                     (a built-in over a huge input) that cannot be interrupted; its other requests wait",
                    slot.name,
                    ran.as_secs_f64()
                );
            }
        }
    }
}
