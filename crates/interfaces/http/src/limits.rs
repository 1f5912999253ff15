//! Process settings a server of many connections needs: the open-file soft limit raised to the
//! hard limit at start, so every connection the hard limit allows can be accepted, and no
//! transparent huge pages, so memory is committed per touched 4 KiB page.

/// Both of the settings below; called by `pmnc run` before anything listens.
pub fn tune_process() {
    raise_open_file_limit();
    disable_transparent_huge_pages();
}

/// The allocator asks for huge pages on its arenas (madvise), and then a few bytes of state of
/// a connection commit a whole 2 MiB page: measured, 37 KB of RSS per parked long-poll with them
/// against 23 KB without (docs/decisions/023-connection-limits-and-memory.md).
pub fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integers.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
            tracing::warn!("cannot turn off transparent huge pages: {}", std::io::Error::last_os_error());
        }
    }
}

/// Raises the soft limit of open files to the hard limit and logs the result.
pub fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            tracing::warn!("cannot read the open-file limit: {}", std::io::Error::last_os_error());
            return;
        }
        if lim.rlim_cur >= lim.rlim_max {
            tracing::info!("open-file limit: {} (already the hard limit)", lim.rlim_cur);
            return;
        }
        let before = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            tracing::warn!("cannot raise the open-file limit from {before} to {}: {}", lim.rlim_max, std::io::Error::last_os_error());
            return;
        }
        tracing::info!("open-file limit raised from {before} to the hard limit {}", lim.rlim_max);
    }
}
