//! A child process of a test (`groupcall`, or the reference peer) whose
//! stdout lines are JSON.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

/// A running `groupcall` process with its stdout lines as JSON.
pub struct Proc {
    pub name: String,
    pub child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<(std::time::Instant, Value)>,
    pub seen: Vec<Value>,
    /// When each line of `seen` was read from the process (same index).
    pub seen_at: Vec<std::time::Instant>,
    pub stderr: Arc<Mutex<String>>,
}

impl Proc {
    /// Starts `cmd` with piped stdout/stderr and this stdin.
    pub fn spawn_cmd(name: &str, mut cmd: Command, stdin: Stdio) -> Proc {
        let mut child = cmd
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        tokio::spawn(async move {
            let mut r = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = r.next_line().await {
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| json!({ "event": "NOT JSON", "line": line }));
                if tx.send((std::time::Instant::now(), v)).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let err = child.stderr.take().unwrap();
        tokio::spawn(async move {
            let mut r = BufReader::new(err).lines();
            while let Ok(Some(line)) = r.next_line().await {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Proc {
            name: name.to_owned(),
            child,
            lines,
            seen: Vec::new(),
            seen_at: Vec::new(),
            stderr,
        }
    }

    /// The reference peer (matrix-js-sdk GroupCall in Node,
    /// `interop/peer.mjs`) with `args`, stdin piped (its end makes the peer
    /// leave and exit). Fails the test when `interop/node_modules` lacks a
    /// package (`scripts/setup-node` installs them).
    pub fn spawn_reference(name: &str, args: &[String]) -> Proc {
        crate::env::require_node_modules();
        let interop = crate::env::interop_dir();
        let mut cmd = Command::new("node");
        cmd.arg(interop.join("peer.mjs"))
            .args(args)
            .current_dir(&interop);
        Self::spawn_cmd(name, cmd, Stdio::piped())
    }

    fn take(&mut self, (at, v): (std::time::Instant, Value)) {
        self.seen.push(v);
        self.seen_at.push(at);
    }

    /// Takes in every line that is there now.
    pub fn poll(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.take(line);
        }
    }

    /// Waits for a line matching `pred`.
    pub async fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    let v = line.1.clone();
                    self.take(line);
                    if pred(&v) {
                        return v;
                    }
                }
                Ok(None) => panic!("{} ended while waiting; {}", self.name, self.report()),
                Err(_) => panic!("{} timed out waiting; {}", self.name, self.report()),
            }
        }
    }

    pub fn signal(&self, sig: Signal) {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), sig);
        }
    }

    /// Waits for the exit and the rest of stdout.
    pub async fn finish(&mut self, timeout: Duration) -> Option<i32> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit; {}", self.name, self.report()))
            .unwrap();
        let rest = async {
            while let Some(line) = self.lines.recv().await {
                self.take(line);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), rest).await;
        status.code()
    }

    /// Events seen (counted by type) and the end of stderr.
    pub fn report(&self) -> String {
        let mut counts = std::collections::BTreeMap::new();
        for v in &self.seen {
            *counts
                .entry(v["event"].as_str().unwrap_or("?").to_owned())
                .or_insert(0) += 1;
        }
        let interesting: Vec<String> = self
            .seen
            .iter()
            .filter(|v| {
                !matches!(
                    v["event"].as_str(),
                    Some("media" | "media_sent" | "signalling")
                )
            })
            .map(Value::to_string)
            .collect();
        let stderr = self.stderr.lock().unwrap();
        let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "event counts {counts:?}\nevents:\n{}\nstderr tail:\n{}",
            interesting.join("\n"),
            tail.join("\n")
        )
    }
}

impl Drop for Proc {
    /// A failed test still leaves cleanly: SIGTERM, a grace period, SIGKILL.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(Signal::SIGTERM);
            let until = Instant::now() + Duration::from_secs(15);
            while Instant::now() < until && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.start_kill();
        }
    }
}
