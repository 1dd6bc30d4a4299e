//! systemd's notify protocol, spoken directly over `NOTIFY_SOCKET` (a datagram socket): READY=1
//! once Redis and PostgreSQL answer, WATCHDOG=1 while the worker loop is alive, STOPPING=1 when
//! a stop begins. Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// When the worker loop last showed it is alive (ms since the epoch); see [`beat`].
static LAST_BEAT_MS: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Called from the worker's live loops (lease renewal, fetching): the watchdog pings systemd only
/// while these keep coming.
pub fn beat() {
    LAST_BEAT_MS.store(now_ms(), Ordering::Relaxed);
}

/// Sends one notification, e.g. "READY=1". Errors are logged, never fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket: its name follows the '@'.
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)
        } else {
            sock.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, state, "notifying systemd failed");
    }
}

/// Asks systemd for `by` more before it gives up on the start (`EXTEND_TIMEOUT_USEC`): sent
/// while aiq waits for Redis or PostgreSQL at boot. Needs `NotifyAccess=exec` for `aiq migrate`
/// (an `ExecStartPre=` command) to be heard.
pub fn extend_start_timeout(by: Duration) {
    notify(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()));
}

/// With `WatchdogSec=` set, pings systemd at half the interval for as long as the worker loop
/// beats; a stalled worker stops the pings and systemd restarts the service.
pub fn spawn_watchdog(stop: CancellationToken) {
    let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let interval = Duration::from_micros(usec);
    beat();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval / 2) => {}
            }
            let since = now_ms().saturating_sub(LAST_BEAT_MS.load(Ordering::Relaxed));
            if since < interval.as_millis() as u64 {
                notify("WATCHDOG=1");
            } else {
                tracing::error!(
                    stalled_ms = since,
                    "the worker loop stalled: no watchdog ping"
                );
            }
        }
    });
}
