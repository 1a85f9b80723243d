//! systemd's notify protocol (sd_notify): READY=1 after the first successful poll,
//! WATCHDOG=1 while the receive loop is alive, STOPPING=1 on shutdown, RELOADING=1 then
//! READY=1 around a config reload (SIGHUP).
//!
//! The protocol is one datagram per message to the socket named by `$NOTIFY_SOCKET` (a path,
//! or an abstract name starting with `@`). Outside systemd the variable is unset and every
//! call does nothing. Deciding *when* the service is healthy is the caller's business.
//!
//! Not a crate (`sd-notify`): the protocol is a line of text in a datagram; reading the
//! socket and the watchdog's `WATCHDOG_USEC`/`WATCHDOG_PID` once, as here, is the whole of
//! what a crate would do for us.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct SystemdNotify {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    /// Half of `WatchdogSec=`, when systemd asked for pings (and they are for this process).
    pub watchdog_every: Option<Duration>,
}

impl SystemdNotify {
    pub fn from_env() -> SystemdNotify {
        let socket = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            let addr = if let Some(name) = path.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                std::os::unix::net::SocketAddr::from_pathname(&path).ok()?
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|_| for_us && socket.is_some())
            .map(|usec| Duration::from_micros(usec) / 2);
        SystemdNotify {
            socket,
            watchdog_every,
        }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    fn send(&self, msg: &str) {
        if let Some((sock, addr)) = &self.socket {
            if let Err(e) = sock.send_to_addr(msg.as_bytes(), addr) {
                tracing::warn!(error = %e, "cannot notify systemd");
            }
        }
    }

    pub fn ready(&self) {
        self.send("READY=1\nSTATUS=polling the queue");
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining in-flight events");
    }

    /// A reload starts (`RELOADING=1` with the monotonic clock, as `Type=notify-reload`
    /// wants); [`SystemdNotify::reloaded`] ends it, whether it was applied or refused.
    pub fn reloading(&self) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let usec = (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000;
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the config"
        ));
    }

    pub fn reloaded(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", status.replace('\n', " ")));
    }

    pub fn status(&self, text: &str) {
        self.send(&format!("STATUS={}", text.replace('\n', " ")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = SystemdNotify {
            socket: Some((
                UnixDatagram::unbound().unwrap(),
                std::os::unix::net::SocketAddr::from_pathname(&path).unwrap(),
            )),
            watchdog_every: None,
        };
        n.ready();
        n.watchdog();
        n.stopping();
        let mut buf = [0u8; 256];
        let mut got = Vec::new();
        for _ in 0..3 {
            let len = server.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..len]).to_string());
        }
        assert!(got[0].starts_with("READY=1"));
        assert_eq!(got[1], "WATCHDOG=1");
        assert!(got[2].starts_with("STOPPING=1"));
    }
}
