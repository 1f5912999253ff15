//! Time-based preemption. No Lua thread runs a hook while it is fresh: a count hook traps every VM
//! instruction of every frame (Lua 5.4 calls `luaG_traceexec` before each one while a count hook
//! is set), which made Lua code 1.4x slower for a check that matters only to code that runs long.
//! Instead, every thread that runs Lua marks when it entered Lua; a watchdog thread that sees one
//! stay in Lua past [`SIGNAL_AFTER`] sends it a signal, whose handler sets a count hook of 1 on the
//! coroutines that may be running there: the request's and those of module code it resumed
//! (`lua_sethook`, which Lua allows in a signal handler: the standalone `lua` interpreter stops
//! a script on Ctrl-C this way). A coroutine is in the chain exactly while Lua can run in it (the
//! prelude's resume adds it inside one C function); the innermost runs, and the others, armed
//! too, stop at once if it returns to them. From then until its slice ends, the running
//! coroutine's hook runs every [`crate::vm`]'s `HOOK_EVERY` instructions, checks the slice and
//! the deadline, and takes the hook off again when it yields (docs/decisions/164).
//!
//! A signal that lands while Lua pushes a call frame or clears a frame's trap can leave the new
//! hook unnoticed by the running frame (the frame's `trap` written back as 0 after the handler set
//! it); the watchdog signals a thread again every [`TICK`] while it stays in Lua, so such a miss
//! costs one tick. Arming from the signal handler writes only the interrupted thread's own
//! `lua_State` and two thread-local cells.
//!
//! The watchdog also reports a thread that stays in one Lua section for a second or more: that
//! is a long C call (a built-in over a huge input) that no hook can interrupt.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mlua::ffi;

/// A thread in Lua this long past its entry is signalled (its slice ends at 1 ms).
const SIGNAL_AFTER: Duration = Duration::from_micros(50);
/// How often the watchdog looks while some thread has been in Lua past [`SIGNAL_AFTER`]: it
/// signals that thread again at each look until the hook has ended its slice.
const TICK: Duration = Duration::from_micros(100);
/// How often it looks while threads ran Lua recently but none was caught in a long section.
/// Ordinary sections last microseconds; looking every 100 µs for them cost a busy process about a
/// tenth of its CPU in wake-ups (10,000 a second) to catch what a look per millisecond (the
/// length of a time slice) catches as well, one slice later at worst.
const BUSY_TICK: Duration = Duration::from_millis(1);
/// How often it looks when every thread has been idle for a while. A thread that enters Lua
/// while the watchdog waits this long wakes it (see [`enter`]), so the first slice after a quiet
/// spell is not 20 ms long.
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
    /// The coroutines that may be running Lua on this thread: each section's own (a request's
    /// coroutine) and the coroutines of module code it resumed, outermost first. The signal
    /// handler arms them all, so it reaches the one running whatever the bookkeeping missed
    /// (plain thread-local cells with constant initialisers: no lazy set-up, safe in a handler).
    static CHAIN: [Cell<*mut ffi::lua_State>; CHAIN_MAX] = const { [const { Cell::new(std::ptr::null_mut()) }; CHAIN_MAX] };
    static CHAIN_LEN: Cell<usize> = const { Cell::new(0) };
    /// Nesting of Lua sections on this thread (Lua calling Rust calling Lua).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Counts this thread's outermost Lua sections; [`ARMED_IN`] holds its value when a hook was
    /// last armed here, so the hook can tell an arming of this section from one left over on a
    /// coroutine that waited in an earlier section.
    static SECTION: Cell<u64> = const { Cell::new(0) };
    static ARMED_IN: Cell<u64> = const { Cell::new(u64::MAX) };
}

/// Coroutines kept in [`CHAIN`]: more than Lua's own limit of nested C calls (200), which each
/// resume counts towards.
const CHAIN_MAX: usize = 256;

/// Whether the watchdog waits [`IDLE_TICK`] (and must be woken when a thread enters Lua).
static WATCHDOG_IDLE: AtomicBool = AtomicBool::new(false);
static WATCHDOG: OnceLock<std::thread::Thread> = OnceLock::new();
/// Times a thread entering Lua woke the idle watchdog (read by tests).
static WAKEUPS: AtomicU64 = AtomicU64::new(0);

/// Whether the watchdog waits its long idle tick now.
pub fn idle() -> bool {
    WATCHDOG_IDLE.load(Ordering::SeqCst)
}

/// How many times a thread entering Lua has woken the idle watchdog.
pub fn wakeups() -> u64 {
    WAKEUPS.load(Ordering::Relaxed)
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
    chain: usize,
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
        SECTION.with(|s| s.set(s.get().wrapping_add(1)));
        with_slot(|slot| {
            // SeqCst with the watchdog's store of WATCHDOG_IDLE and its reads of `since`: either
            // it sees this section before it waits long, or this thread sees it idle and wakes it.
            slot.since.store(nanos(now), Ordering::SeqCst);
            slot.reported.store(false, Ordering::Relaxed);
        });
        if WATCHDOG_IDLE.load(Ordering::SeqCst) && WATCHDOG_IDLE.swap(false, Ordering::SeqCst) {
            WAKEUPS.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = WATCHDOG.get() {
                t.unpark();
            }
        }
    }
    let chain = push(state);
    Section { chain, outermost: depth == 0 }
}

impl Drop for Section {
    fn drop(&mut self) {
        truncate(self.chain);
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        if self.outermost {
            with_slot(|slot| slot.since.store(0, Ordering::Relaxed));
        }
    }
}

/// Adds `state` (a coroutine this thread is about to run Lua in) to the ones the signal arms;
/// returns how many there were before, for [`truncate`]. A null `state` adds nothing.
pub fn push(state: *mut ffi::lua_State) -> usize {
    let len = CHAIN_LEN.with(|l| l.get());
    if state.is_null() || len >= CHAIN_MAX {
        return len;
    }
    CHAIN.with(|c| c[len].set(state));
    CHAIN_LEN.with(|l| l.set(len + 1));
    len
}

/// Forgets the coroutines added after the first `len`.
pub fn truncate(len: usize) {
    CHAIN_LEN.with(|l| {
        if len < l.get() {
            l.set(len)
        }
    });
}

/// mlua's C hook function (the same for every VM): what [`arm`] installs. Null until the first
/// VM is made.
static HOOK: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

/// Notes mlua's C hook function, read back from a thread where mlua installed it.
pub fn set_hook_function(hook: Option<ffi::lua_Hook>) {
    if let Some(f) = hook {
        HOOK.store(f as *mut (), Ordering::Relaxed);
    }
}

/// Whether [`arm`] works (the first VM has been made).
pub fn can_arm() -> bool {
    !HOOK.load(Ordering::Relaxed).is_null()
}

/// Sets `state`'s count hook to run after `count` instructions, as armed in this thread's current
/// Lua section.
///
/// # Safety
/// `state` must be a live Lua thread of a VM made by [`crate::vm::CageVm::new`], on this thread:
/// the one running, or one suspended.
pub unsafe fn arm(state: *mut ffi::lua_State, count: i32) {
    let hook = HOOK.load(Ordering::Relaxed);
    if hook.is_null() {
        return;
    }
    ARMED_IN.with(|a| a.set(SECTION.with(|s| s.get())));
    // SAFETY: HOOK holds only a function of the lua_Hook type (set_hook_function).
    let hook = std::mem::transmute::<*mut (), unsafe extern "C-unwind" fn(*mut ffi::lua_State, *mut ffi::lua_Debug)>(hook);
    ffi::lua_sethook(state, Some(hook), ffi::LUA_MASKCOUNT, count);
}

/// Takes `state`'s hook off (its frames' traps clear themselves at their next instruction).
///
/// # Safety
/// As for [`arm`].
pub unsafe fn disarm(state: *mut ffi::lua_State) {
    ffi::lua_sethook(state, None, 0, 0);
}

/// Whether a hook running now was armed in this thread's current Lua section: false for one
/// left over on a coroutine that was armed, then waited (a Rust call) and is resumed now.
pub fn armed_here() -> bool {
    DEPTH.with(|d| d.get()) > 0 && ARMED_IN.with(|a| a.get()) == SECTION.with(|s| s.get())
}

extern "C" fn on_signal(_: libc::c_int) {
    let len = CHAIN_LEN.with(|l| l.get()).min(CHAIN_MAX);
    CHAIN.with(|c| {
        for cell in &c[..len] {
            let state = cell.get();
            // SAFETY: a coroutine is in CHAIN only while this thread runs Lua inside it or inside
            // one it resumed (and holds a reference to it meanwhile); the handler runs on that
            // same thread, and lua_sethook touches only that state's hook fields and the traps
            // of its call frames. One that is not running notices its hook when it runs again.
            unsafe { arm(state, 1) }
        }
    });
}

/// Starts the watchdog thread and installs the signal handler, once per process.
fn start() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        // SAFETY: a plain handler that only reads thread-local cells and calls lua_sethook.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGURG, &action, std::ptr::null_mut());
        }
        if let Ok(handle) = std::thread::Builder::new().name("pmnc-watchdog".into()).spawn(watch) {
            let _ = WATCHDOG.set(handle.thread().clone());
        }
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
        if pause == IDLE_TICK {
            WATCHDOG_IDLE.store(true, Ordering::SeqCst);
            // A thread that entered Lua before the store above is seen here; one after it sees
            // the store and wakes this thread.
            let any_in_lua = SLOTS.lock().map(|slots| slots.iter().any(|s| s.since.load(Ordering::SeqCst) != 0)).unwrap_or(false);
            if !any_in_lua {
                std::thread::park_timeout(pause);
            }
            // Cleared already: a thread entered Lua and woke us. Busy looks for the next second,
            // so a busy process with short sections wakes the watchdog once a second at most.
            if !WATCHDOG_IDLE.swap(false, Ordering::SeqCst) {
                idle_since = Instant::now();
            }
        } else {
            std::thread::sleep(pause);
        }
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
