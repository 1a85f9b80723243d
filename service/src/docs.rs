//! The man page and the shell completions, generated from the clap definitions (`cli.rs`)
//! by `provision generate-docs DIR`, which `scripts/package` runs before `cargo deb`.
//! Generated rather than written so they can never drift from `--help`. That command is
//! deliberately not in `cli.rs` (`main.rs` dispatches it before parsing): it is for
//! packaging, and anything in `cli.rs` shows up in the completions.
//!
//! Owns what goes into `provision.1` beyond clap's sections (files, environment, the
//! shorthand, where to read more); not how they are installed (Cargo.toml's deb assets).

use std::io::Write as _;
use std::path::Path;

use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cli::Cli;

/// File names written into the directory, each as the package installs it.
pub const MAN_PAGE: &str = "provision.1";
pub const BASH: &str = "provision.bash";
pub const ZSH: &str = "_provision";
pub const FISH: &str = "provision.fish";

/// `provision generate-docs DIR`: [`write`], exit 0; a usage message and exit 2 otherwise.
pub fn run(args: &[std::ffi::OsString]) -> std::process::ExitCode {
    const USAGE: &str = "usage: provision generate-docs DIR\n\nwrites provision.1 and the bash, zsh and fish completions into DIR (created)";
    let [dir] = args else {
        eprintln!("{USAGE}");
        return std::process::ExitCode::from(2);
    };
    // An option is never a directory name: `--help` asks for this text, anything else is a mistake.
    let arg = dir.to_string_lossy();
    if arg == "--help" || arg == "-h" {
        println!("{USAGE}");
        return std::process::ExitCode::SUCCESS;
    }
    if arg.starts_with('-') {
        eprintln!("provision generate-docs: unknown option {arg}\n{USAGE}");
        return std::process::ExitCode::from(2);
    }
    match write(Path::new(dir)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("provision: generate-docs {}: {e}", Path::new(dir).display());
            std::process::ExitCode::from(2)
        }
    }
}

/// Writes the man page and the bash, zsh and fish completions into `dir` (created).
pub fn write(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(MAN_PAGE), man_page()?)?;
    for (shell, name) in [(Shell::Bash, BASH), (Shell::Zsh, ZSH), (Shell::Fish, FISH)] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "provision", &mut out);
        std::fs::write(dir.join(name), out)?;
    }
    Ok(())
}

/// `provision.1`: clap's sections (name, synopsis, description, options), every command
/// with its options, the sections clap knows nothing about, and clap's version section.
pub fn man_page() -> std::io::Result<Vec<u8>> {
    let cmd = Cli::command();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    // Every command with its own options, as `provision COMMAND --help` shows them. Not
    // clap_mangen's SUBCOMMANDS section: it points at provision-COMMAND(1) pages, and one
    // page is easier to search.
    writeln!(out, ".SH COMMANDS")?;
    for sub in documented(&cmd) {
        subcommand(&mut out, &["provision"], sub)?;
    }
    out.extend_from_slice(EXTRA_SECTIONS.as_bytes());
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// The subcommands worth a section: not hidden, and not clap's own `help`.
fn documented(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
}

fn subcommand(out: &mut Vec<u8>, parents: &[&str], cmd: &clap::Command) -> std::io::Result<()> {
    let mut path = parents.to_vec();
    path.push(cmd.get_name());
    let mut usage = cmd.clone().bin_name(path.join(" "));
    writeln!(out, ".SS \"{}\"", path.join(" "))?;
    writeln!(out, ".nf")?;
    writeln!(out, "{}", roff_escape(&usage.render_usage().to_string()))?;
    writeln!(out, ".fi")?;
    if let Some(about) = cmd.get_long_about().or(cmd.get_about()) {
        writeln!(out, ".PP\n{}", roff_escape(&about.to_string()))?;
    }
    for arg in cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !a.is_global_set())
    {
        let name = match (arg.get_short(), arg.get_long()) {
            (Some(s), Some(l)) => format!("-{s}, --{l}"),
            (None, Some(l)) => format!("--{l}"),
            (Some(s), None) => format!("-{s}"),
            (None, None) => arg.get_id().to_string().to_uppercase(),
        };
        let takes_value = arg.get_action().takes_values() && arg.get_long().is_some();
        let value = if takes_value {
            format!(
                " {}",
                arg.get_value_names()
                    .and_then(|v| v.first())
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| arg.get_id().to_string().to_uppercase())
            )
        } else {
            String::new()
        };
        writeln!(
            out,
            ".TP\n\\fB{}\\fR{}",
            roff_escape(&name),
            roff_escape(&value)
        )?;
        if let Some(help) = arg.get_long_help().or(arg.get_help()) {
            writeln!(out, "{}", roff_escape(&help.to_string()))?;
        }
    }
    for sub in documented(cmd) {
        subcommand(out, &path, sub)?;
    }
    Ok(())
}

/// Escapes text for roff: backslashes, and a leading dot or quote that would start a request.
fn roff_escape(text: &str) -> String {
    text.lines()
        .map(|l| {
            let l = l.replace('\\', "\\e").replace('-', "\\-");
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}")
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const EXTRA_SECTIONS: &str = r#".SH SHORTHAND
\fBprovision i\-0123456789abcdef0\fR is short for \fBprovision instance i\-0123456789abcdef0\fR.
.SH FILES
.TP
\fI/etc/provision/provision.toml\fR
The configuration (a conffile); every key is commented in it. \fBprovision check\fR validates it.
.TP
\fI/etc/provision/credentials/\fR
The vault password (\fIvault\-password\fR, may be empty) and the SSH private key (\fIssh\-key\fR) the unit hands the daemon with LoadCredential=.
.TP
\fI/var/lib/provision/state.db\fR
The SQLite history and the claims on lifecycle action tokens (StateDirectory=). A file from a newer release is refused.
.TP
\fI/usr/share/provision/playbooks/\fR
The example playbooks the example configuration names.
.TP
\fI/usr/share/provision/monitoring/\fR
A Grafana dashboard and Prometheus alert rules for the metrics the daemon serves on metrics.listen.
.SH ENVIRONMENT
.TP
\fBPROVISION_CONFIG\fR
The configuration file when \fB\-\-config\fR is not given.
.TP
\fBRUST_LOG\fR
Log levels, overriding \fB\-v\fR (for example \fIprovision=debug,warn\fR).
.TP
\fBAWS_REGION\fR, \fBAWS_ENDPOINT_URL\fR, ...
The AWS SDK's standard settings; credentials come from the standard chain and are removed from the environment at start so no child inherits them.
.SH EXIT STATUS
0 on success; 1 when \fBworker\fR left messages to come back, \fBcheck\fR found a problem, \fBevent parse\fR rejected the message, or a manual run's step failed; 2 on a startup error (a broken configuration included).
.SH "SEE ALSO"
\fBsystemctl\fR(1), \fBjournalctl\fR(1), \fBsystemd.exec\fR(5), \fBansible\-playbook\fR(1), \fI/usr/share/doc/provision/README.md\fR
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_man_page_documents_every_visible_command_and_option() {
        let page = String::from_utf8(man_page().unwrap()).unwrap();
        assert!(page.starts_with(".ie \\n(.g .ds Aq"), "{}", &page[..200]);
        for sub in Cli::command().get_subcommands() {
            let name = format!(".SS \"provision {}\"", sub.get_name());
            assert_eq!(page.contains(&name), !sub.is_hide_set(), "{name}");
        }
        for option in [
            "\\-\\-dry\\-run",
            "\\-\\-no\\-complete",
            "\\-\\-aws",
            "\\-\\-limit",
            "\\-\\-log\\-format",
        ] {
            assert!(page.contains(option), "{option} missing");
        }
        assert!(page.contains(".SH FILES") && page.contains(".SH \"SEE ALSO\""));
        assert!(
            !page.contains("generate"),
            "the hidden subcommand is not documented"
        );
    }

    #[test]
    fn completions_know_the_subcommands_and_not_the_hidden_one() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path()).unwrap();
        for name in [BASH, ZSH, FISH] {
            let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
            for sub in ["daemon", "worker", "check", "history", "instance"] {
                assert!(text.contains(sub), "{name} lacks {sub}");
            }
            assert!(
                !text.contains("generate-docs"),
                "{name} offers the hidden subcommand"
            );
        }
        assert!(std::fs::read_to_string(dir.path().join(ZSH))
            .unwrap()
            .starts_with("#compdef provision"));
    }
}
