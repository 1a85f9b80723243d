//! Host keys: the keys an instance printed on its console at first boot, and ssh's refusal
//! of a server presenting another one, in words for the history.
//!
//! Owns reading the FIRST `-----BEGIN SSH HOST KEY KEYS-----` block of a console log (anything
//! on the instance can print a later one). Not here: fetching the console and waiting for
//! the block ([`super::reach`]), keeping the keys ([`super::known_hosts`]).

use super::reach::Target;
use super::settings::HostKeyCheck;

/// The keys in the first complete `SSH HOST KEY KEYS` block of a console log, as
/// `type base64` (comments dropped). None while no complete block is there yet.
pub fn console_host_keys(console: &str) -> Option<Vec<String>> {
    const BEGIN: &str = "-----BEGIN SSH HOST KEY KEYS-----";
    const END: &str = "-----END SSH HOST KEY KEYS-----";
    let mut lines = console.lines().map(|l| l.trim_end_matches('\r'));
    lines.find(|l| l.trim_end().ends_with(BEGIN))?;
    let mut keys = Vec::new();
    for line in lines {
        if line.trim_end().ends_with(END) {
            return Some(keys);
        }
        let mut parts = line.split_whitespace();
        if let (Some(kind), Some(data)) = (parts.next(), parts.next()) {
            let known = matches!(
                kind,
                "ssh-ed25519"
                    | "ssh-rsa"
                    | "ecdsa-sha2-nistp256"
                    | "ecdsa-sha2-nistp384"
                    | "ecdsa-sha2-nistp521"
            );
            let b64 = data.len() >= 16
                && data
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
            if known && b64 {
                keys.push(format!("{kind} {data}"));
            }
        }
    }
    None
}

/// When ssh refused the server's key: why, in words for the history.
pub fn key_refused(check: &HostKeyCheck, ssh_error: &str, t: &Target) -> Option<String> {
    let refused = ssh_error.contains("Host key verification failed")
        || ssh_error.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || ssh_error.contains("host key for")
        || ssh_error.contains("No matching host key");
    if !refused {
        return None;
    }
    let against = match check {
        HostKeyCheck::Console => format!("is not one of the keys in {}'s console output", t.id),
        HostKeyCheck::AcceptNew => "differs from the one it presented first".to_string(),
        HostKeyCheck::KnownHosts(p) => format!("is not in {}", p.display()),
        HostKeyCheck::Off => "was refused".to_string(),
    };
    Some(format!(
        "host key refused: the SSH server at {}:{} presented a key that {against}; not connecting (possible man-in-the-middle). ssh said: {}",
        t.address,
        t.port,
        ssh_error.lines().last().unwrap_or_default().trim()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIGj0vNj1c0yJb2m4Ee0hOPHVdqvRyYR3Y0nCk0QpX9aM";

    #[test]
    fn takes_the_first_complete_block_only() {
        let console = format!(
            "[    1.0] boot\r\n<14>Nov 22 cloud-init: -----BEGIN SSH HOST KEY FINGERPRINTS-----\r\n\
             <14>Nov 22 cloud-init: 256 SHA256:abc root@h (ED25519)\r\n\
             -----BEGIN SSH HOST KEY KEYS-----\r\nssh-ed25519 {KEY} root@h\r\n\
             [   12.5] random: crng init done\r\n-----END SSH HOST KEY KEYS-----\r\n\
             -----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 AAAAforgedforgedforgedforged x\n-----END SSH HOST KEY KEYS-----\n"
        );
        assert_eq!(
            console_host_keys(&console),
            Some(vec![format!("ssh-ed25519 {KEY}")])
        );
    }

    #[test]
    fn an_unfinished_block_is_not_yet_an_answer() {
        assert_eq!(console_host_keys("boot\n"), None);
        let partial = format!("-----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 {KEY}\n");
        assert_eq!(console_host_keys(&partial), None);
        let junk =
            "-----BEGIN SSH HOST KEY KEYS-----\n$(reboot) now\n-----END SSH HOST KEY KEYS-----\n";
        assert_eq!(console_host_keys(junk), Some(vec![]));
    }
}

/// Console output is the instance's to write: whatever it holds, reading it never panics,
/// and what it yields is only well-formed keys, no more than it holds.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn console() -> impl Strategy<Value = String> {
        let line = prop_oneof![
            Just("-----BEGIN SSH HOST KEY KEYS-----".to_string()),
            Just("-----END SSH HOST KEY KEYS-----".to_string()),
            "(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp256|ssh-dss) [A-Za-z0-9+/=]{0,40}( \\PC{0,10})?",
            "\\PC{0,80}",
            prop::collection::vec(any::<char>(), 0..200).prop_map(|c| c.into_iter().collect()),
        ];
        prop::collection::vec(line, 0..40).prop_map(|lines| lines.join("\r\n"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_console_yields_only_well_formed_keys(c in console()) {
            if let Some(keys) = console_host_keys(&c) {
                prop_assert!(keys.len() <= c.lines().count());
                prop_assert!(keys.iter().map(String::len).sum::<usize>() <= c.len());
                for k in keys {
                    let (kind, data) = k.split_once(' ').unwrap();
                    prop_assert!(kind.starts_with("ssh-") || kind.starts_with("ecdsa-"), "{}", k);
                    prop_assert!(kind != "ssh-dss");
                    prop_assert!(data.len() >= 16 && !data.contains(' '), "{}", k);
                }
            }
        }
    }
}
