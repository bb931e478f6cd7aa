//! `groupcall`: native Matrix group calls (MSC3401) from the command line.
//!
//! - `groupcall join`: log in, join (or start) a room's group call, send test
//!   or file media, report what happens (a live view, or JSON lines with
//!   `--json`), obey commands on stdin, leave cleanly on a signal.
//! - `groupcall synapse`: a throwaway local Synapse with users and a call
//!   room, for trying things out and for tests.
//! - `groupcall demo`: the whole system on a fresh machine: a local Synapse,
//!   N participants, live progress, a summary table and a report.
//! - `groupcall focus`: a focus (SFU, MSC3898) as a Matrix bot device,
//!   configured by focus.toml.
//! - `groupcall bench setup`: call setup time, signalling and CPU against
//!   the reference implementation (matrix-js-sdk).

// matrix-sdk's deeply nested futures overflow the default limit (E0275).
#![recursion_limit = "256"]

mod args;
mod bench;
mod commands;
mod demo;
mod demo_focus;
mod focus;
mod join;
mod local;
mod output;
mod peers;
mod proxy;
mod report;
mod synapse;
mod tracker;
mod view;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::args::{BenchCmd, Cli, Cmd};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(&e),
    };
    let live_view =
        matches!(&cli.command, Cmd::Join(a) if !a.json) && std::io::stdout().is_terminal();
    // The demo and the benchmarks print their own progress.
    let quiet = live_view || matches!(&cli.command, Cmd::Demo(_) | Cmd::Bench(_));
    init_logging(quiet);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::anyhow!("starting the async runtime: {e}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Join(args) => join::run(args).await,
            Cmd::Synapse(args) => synapse::run(args).await,
            Cmd::Demo(args) => demo::run(args).await,
            Cmd::Focus(args) => focus::run(args).await,
            Cmd::Bench(BenchCmd::Setup(args)) => bench::run_setup(args).await,
            Cmd::Bench(BenchCmd::Focus(args)) => bench::focus_bench::run(args).await,
            Cmd::Bench(BenchCmd::Loadgen) => bench::loadgen::run().await,
        }
    });
    // Do not wait for tasks that are still blocked (stdin reader, HTTP).
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    let _ = std::io::stdout().flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Prints one `error: ...` line and returns exit code 1.
fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("error: {}", chain_line(e));
    ExitCode::from(1)
}

/// An error and its causes on one line, leaving out causes whose text an
/// outer message already includes.
fn chain_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    one_line(&msg)
}

/// Help and version go to stdout with exit code 0; usage errors become one
/// `error: ...` line on stderr with exit code 2.
fn clap_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(if e.use_stderr() { 2 } else { 0 })
        }
        _ => {
            eprintln!("{} (see --help)", clap_one_line(&e.render().to_string()));
            ExitCode::from(2)
        }
    }
}

/// The part of clap's message before its tips and usage, on one line.
fn clap_one_line(rendered: &str) -> String {
    let head: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = one_line(&head.join(" "));
    if line.starts_with("error:") {
        line
    } else {
        format!("error: {line}")
    }
}

/// Collapses whitespace runs (newlines included) into single spaces.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Logs go to stderr. `RUST_LOG` wins; the default is `info` for groupcall's
/// crates and `warn` for the rest, or `warn` everywhere while the live view
/// owns the terminal. matrix-sdk's request errors (it logs expected 404s of
/// a fresh login as errors; real failures come back to us as errors) and
/// its key backup warnings (we use no backup) are off by default.
fn init_logging(quiet: bool) {
    const QUIET_SDK: &str = "matrix_sdk::http_client=off,matrix_sdk_crypto::backups=error";
    let default = if quiet {
        // matrix-sdk's crypto warns about every encrypted call event ("an
        // unexpected encrypted to-device event"): not news in a demo.
        format!("warn,{QUIET_SDK},matrix_sdk_crypto=error")
    } else {
        format!(
            "warn,groupcall=info,groupcall_proto=info,groupcall_media=info,\
             groupcall_synapse=info,groupcall_focus=info,{QUIET_SDK}"
        )
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.trim().is_empty() => {
            EnvFilter::try_new(&s).unwrap_or_else(|_| EnvFilter::new(&default))
        }
        _ => EnvFilter::new(&default),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_become_one_line() {
        let rendered = "error: the following required arguments were not provided:\n  \
                        --homeserver <URL>\n  --user <NAME>\n\nUsage: groupcall join \
                        --homeserver <URL>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            clap_one_line(rendered),
            "error: the following required arguments were not provided: --homeserver <URL> \
             --user <NAME>"
        );
    }

    #[test]
    fn causes_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = anyhow::Error::new(io)
            .context("reading x: gone")
            .context("using\nx");
        assert_eq!(chain_line(&e), "using x: reading x: gone");
    }

    #[test]
    fn parse_errors_exit_2() {
        let e = Cli::try_parse_from(["groupcall", "join", "--bogus"])
            .err()
            .expect("a bogus flag is refused");
        assert_eq!(clap_error(&e), ExitCode::from(2));
    }
}
