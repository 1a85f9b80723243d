//! The command line's shape: every command, option and help text, as clap definitions.
//!
//! In the library rather than in `main.rs` so that the man page and the shell completions
//! (`docs.rs`) are generated from the very definitions `--help` prints, and never drift from
//! them. What the commands do is `main.rs` and the modules it calls.

use std::path::PathBuf;

use clap::builder::PossibleValue;
use clap::{Parser, Subcommand, ValueEnum};

use crate::event::Transition;
use crate::telemetry::LogFormat;

#[derive(Parser)]
#[command(
    name = "provision",
    version,
    about = "Configures EC2 instances held by Auto Scaling lifecycle hooks, then completes the hooks."
)]
pub struct Cli {
    /// Config file [default: $PROVISION_CONFIG, else /etc/provision/provision.toml]
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Log format on stderr
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// More detail in logs (RUST_LOG overrides)
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run an instance's layer by hand (also: `provision i-0123456789abcdef0`), then complete
    /// its pending lifecycle action
    Instance {
        /// The EC2 instance id
        id: String,
        /// Print the plan (layer, steps with templates filled in) and change nothing
        #[arg(long)]
        dry_run: bool,
        /// Run the steps but leave the pending lifecycle action as it is
        #[arg(long)]
        no_complete: bool,
        /// Use this layer instead of the one the instance's group matches
        #[arg(long)]
        layer: Option<String>,
        /// launch or terminate [default: from the instance's lifecycle state]
        #[arg(long, value_enum)]
        transition: Option<Transition>,
        /// The hook to complete, when the group has several for the transition
        #[arg(long)]
        hook: Option<String>,
        /// The source whose account, region and role the instance belongs to (a
        /// [sources.NAME], or "queue" for [queue]) [default: the first]
        #[arg(long)]
        source: Option<String>,
    },
    /// Long-poll the queue and handle lifecycle events until SIGTERM/SIGINT
    Daemon,
    /// Compare Auto Scaling with what messages announced: work actions waiting with no run
    /// of ours (as `provision <instance-id>` does), and report (or configure, or replace)
    /// instances in service that no launch run configured; print what was found and done
    Reconcile {
        /// Print what would be done and change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Drain the queue once, then exit (status 0 only if every message was handled)
    Worker,
    /// Inspect messages
    #[command(subcommand)]
    Event(EventCommand),
    /// Validate the config (and with --aws, the queue, topic and hooks it names); exit 1 on
    /// any problem, 2 when the config itself is broken
    Check {
        /// Also ask AWS: the queue is readable, the topic exists, groups have hooks
        #[arg(long)]
        aws: bool,
    },
    /// Show what was done (latest first)
    History {
        /// Only runs for this instance
        #[arg(long)]
        instance: Option<String>,
        /// Only runs for this Auto Scaling group
        #[arg(long)]
        group: Option<String>,
        /// Only runs for lifecycle messages from this account
        #[arg(long)]
        account: Option<String>,
        /// Only runs from a source in this region
        #[arg(long)]
        region: Option<String>,
        /// Only runs with this outcome (succeeded, failed, rejected, skipped, ...)
        #[arg(long)]
        outcome: Option<String>,
        /// This host's own history (state.path) even when state.history_table is set
        #[arg(long)]
        local: bool,
        /// How many runs
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// One JSON document instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Serve as an AWS Lambda function with an SQS trigger (inside Lambda only)
    Lambda,
}

#[derive(Subcommand)]
pub enum EventCommand {
    /// Parse a message body (FILE, or - for stdin) and print the normalized event as JSON,
    /// or why it would be skipped or rejected
    Parse { file: String },
}

/// `--transition launch|terminate`: the event's own names.
impl ValueEnum for Transition {
    fn value_variants<'a>() -> &'a [Self] {
        &[Transition::Launch, Transition::Terminate]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.as_str()))
    }
}
