//! Stopping a child process and everything it started: its own process group, asked to
//! stop (SIGTERM), given a grace period, then killed (SIGKILL).
//!
//! The children of steps (`ansible-playbook` and its workers and ssh clients) start in a
//! process group of their own (`process_group(0)`), so that stopping one reaches all of them
//! and nothing of this service. Owns only the stopping; output is `output.rs`.

use std::time::Duration;

/// How long a stopped group gets between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(5);

/// A child's process group, stopped unless disarmed: at once with [`Group::stop`], or when
/// dropped (shutdown, a cancelled run) with the grace counted on a thread of its own.
pub struct Group {
    pgid: Option<i32>,
    grace: Duration,
}

impl Group {
    /// The group of a child started with `process_group(0)` (its pid is the group id).
    pub fn of(child: &tokio::process::Child, grace: Duration) -> Group {
        Group {
            pgid: child.id().map(|p| p as i32),
            grace,
        }
    }

    /// The child ended by itself: nothing to stop.
    pub fn disarm(mut self) {
        self.pgid = None;
    }

    /// SIGTERM to the group, up to the grace period for the child to exit, then SIGKILL to
    /// the group; the child is reaped either way.
    pub async fn stop(mut self, child: &mut tokio::process::Child) {
        let Some(pgid) = self.pgid.take() else { return };
        signal(pgid, libc::SIGTERM);
        if tokio::time::timeout(self.grace, child.wait())
            .await
            .is_err()
        {
            tracing::warn!(pgid, grace = ?self.grace, "the child ignored SIGTERM; killing its group");
        }
        // Workers may outlive the leader: the group goes in any case.
        signal(pgid, libc::SIGKILL);
        let _ = child.wait().await;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let Some(pgid) = self.pgid.take() else { return };
        signal(pgid, libc::SIGTERM);
        let grace = self.grace;
        std::thread::spawn(move || {
            std::thread::sleep(grace);
            // Still there (a member of the group is alive, which also keeps the id from
            // being reused): killed.
            // SAFETY: kill(2) with signal 0 only checks that the group exists.
            if unsafe { libc::kill(-pgid, 0) } == 0 {
                signal(pgid, libc::SIGKILL);
            }
        });
    }
}

fn signal(pgid: i32, sig: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group a child of ours leads.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> tokio::process::Child {
        tokio::process::Command::new("sh")
            .args(["-c", script])
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    fn group_exists(pgid: i32) -> bool {
        // SAFETY: signal 0 only checks.
        unsafe { libc::kill(-pgid, 0) == 0 }
    }

    /// The group's members are gone. Those that were not our children are reaped by init,
    /// not by us: they may linger a moment as zombies.
    async fn assert_group_gone(pgid: i32) {
        for _ in 0..50 {
            if !group_exists(pgid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the group outlived its stop");
    }

    #[tokio::test]
    async fn a_child_that_obeys_sigterm_ends_within_the_grace() {
        // The shell and a worker of its own: both in the group.
        let mut child = sh("sleep 600 & wait");
        let pgid = child.id().unwrap() as i32;
        Group::of(&child, Duration::from_secs(30))
            .stop(&mut child)
            .await;
        let status = child.wait().await.unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM),
            "ended by SIGTERM, not by the SIGKILL after the grace"
        );
        assert_group_gone(pgid).await;
    }

    #[tokio::test]
    async fn a_child_that_ignores_sigterm_is_killed_after_the_grace() {
        let mut child = sh("trap '' TERM; sleep 600 & wait; sleep 600");
        let pgid = child.id().unwrap() as i32;
        tokio::time::sleep(Duration::from_millis(200)).await;
        Group::of(&child, Duration::from_millis(300))
            .stop(&mut child)
            .await;
        let status = child.wait().await.unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        // The group's other members went too.
        assert_group_gone(pgid).await;
    }
}
