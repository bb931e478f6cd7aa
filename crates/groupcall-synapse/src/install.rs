//! The cached venv with a pinned `matrix-synapse`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::SynapseError;

/// The `matrix-synapse` version installed into the venv.
pub const SYNAPSE_VERSION: &str = "1.163.2";

/// Marker written into the venv once pip succeeded; holds the version.
const MARKER: &str = ".groupcall-synapse-installed";

/// `$GROUPCALL_CACHE_DIR`, else `$XDG_CACHE_HOME/groupcall`, else
/// `~/.cache/groupcall`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(d) = non_empty("GROUPCALL_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = non_empty("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("groupcall"));
    }
    non_empty("HOME").map(|h| PathBuf::from(h).join(".cache").join("groupcall"))
}

pub(crate) fn venv_python(venv: &Path) -> PathBuf {
    venv.join("bin").join("python")
}

fn installed(venv: &Path) -> bool {
    std::fs::read_to_string(venv.join(MARKER)).is_ok_and(|v| v.trim() == SYNAPSE_VERSION)
        && venv_python(venv).exists()
}

/// Returns the venv path, installing Synapse into it first when needed.
pub(crate) async fn ensure_venv(
    cache_dir: &Path,
    python: &str,
    allow_install: bool,
) -> Result<PathBuf, SynapseError> {
    let venv = cache_dir.join("synapse-venv");
    if installed(&venv) {
        return Ok(venv);
    }
    if !allow_install {
        return Err(SynapseError::NotInstalled {
            venv,
            version: SYNAPSE_VERSION.to_owned(),
        });
    }
    std::fs::create_dir_all(cache_dir).map_err(SynapseError::io(format!(
        "creating {}",
        cache_dir.display()
    )))?;

    // Only one process installs; the others wait for the lock and then find
    // the marker.
    let lock_path = cache_dir.join("synapse-venv.lock");
    let lock = File::create(&lock_path).map_err(SynapseError::io(format!(
        "creating {}",
        lock_path.display()
    )))?;
    let mut told = false;
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {
                if !told {
                    info!(lock = %lock_path.display(), "another process is installing Synapse; waiting");
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(SynapseError::Io {
                    what: format!("locking {}", lock_path.display()),
                    source: e,
                });
            }
        }
    }
    let result = if installed(&venv) {
        Ok(())
    } else {
        install(cache_dir, &venv, python).await
    };
    // Unlocks (the lock also goes away with the file handle).
    drop(lock);
    result.map(|()| venv)
}

async fn install(cache_dir: &Path, venv: &Path, python: &str) -> Result<(), SynapseError> {
    let version = SYNAPSE_VERSION.to_owned();
    let fail = |step: &str, log: String| SynapseError::InstallFailed {
        venv: venv.to_owned(),
        version: version.clone(),
        step: step.to_owned(),
        log: tail_lines(&log, 40),
    };

    // Is the interpreter there at all?
    let probe = tokio::process::Command::new(python)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Err(SynapseError::PythonMissing {
                python: python.to_owned(),
                reason: format!(
                    "`{python} --version` exited with {}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            });
        }
        Err(e) => {
            return Err(SynapseError::PythonMissing {
                python: python.to_owned(),
                reason: e.to_string(),
            });
        }
    }

    if venv.exists() {
        warn!(venv = %venv.display(), "removing incomplete Synapse venv");
        std::fs::remove_dir_all(venv)
            .map_err(SynapseError::io(format!("removing {}", venv.display())))?;
    }
    let started = Instant::now();
    info!(
        venv = %venv.display(),
        version = SYNAPSE_VERSION,
        "installing matrix-synapse into a venv (takes ~20-30 s)"
    );
    let out = tokio::process::Command::new(python)
        .args(["-m", "venv"])
        .arg(venv)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(SynapseError::io(format!("running {python} -m venv")))?;
    if !out.status.success() {
        return Err(fail(
            "python -m venv (Debian needs the python3-venv package)",
            output_text(&out),
        ));
    }

    let log_path = cache_dir.join("synapse-install.log");
    let log_file = File::create(&log_path)
        .map_err(SynapseError::io(format!("creating {}", log_path.display())))?;
    let log_err = log_file
        .try_clone()
        .map_err(SynapseError::io("duplicating the install log handle"))?;
    let status = tokio::process::Command::new(venv_python(venv))
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
        ])
        .arg(format!("matrix-synapse=={SYNAPSE_VERSION}"))
        .stdin(std::process::Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .status()
        .await
        .map_err(SynapseError::io("running pip install"))?;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    if !status.success() {
        // Leave no half-installed venv behind.
        let _ = std::fs::remove_dir_all(venv);
        return Err(fail(&format!("pip install exited with {status}"), log));
    }
    std::fs::write(venv.join(MARKER), SYNAPSE_VERSION)
        .map_err(SynapseError::io("writing the install marker"))?;
    info!(
        venv = %venv.display(),
        secs = started.elapsed().as_secs_f32(),
        "matrix-synapse installed"
    );
    Ok(())
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub(crate) fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}
