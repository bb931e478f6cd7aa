//! What tests need from the machine, checked (never installed) here:
//! `scripts/setup-system` installs the Debian packages and
//! `scripts/setup-node` the reference peer's npm packages (`scripts/test`
//! runs both), so a missing piece fails the test with the command to run.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `interop/`, where the reference peer lives.
pub fn interop_dir() -> PathBuf {
    repo_root().join("interop")
}

/// The packages `peer.mjs` and `browser.mjs` load; the same list as
/// `scripts/setup-node`.
const NODE_PACKAGES: [&str; 5] = [
    "matrix-js-sdk",
    "@roamhq/wrtc",
    "@matrix-org/matrix-sdk-crypto-wasm",
    "playwright-core",
    "esbuild",
];

/// Checks that `interop/node_modules` holds every package the reference
/// peer needs. Tests install nothing: `scripts/setup-node` does (and
/// `scripts/test` runs it), so a missing package fails the test with the
/// command to run.
pub fn require_node_modules() {
    let dir = interop_dir().join("node_modules");
    let missing: Vec<&str> = NODE_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dir.join(p).join("package.json").exists())
        .collect();
    assert!(
        missing.is_empty(),
        "interop/node_modules lacks {}: run scripts/setup-node (scripts/test does)",
        missing.join(", ")
    );
}

/// The Chromium binary for `browser.mjs` (`$CHROMIUM` or `/usr/bin/chromium`).
/// Tests install nothing: `scripts/setup-system` installs Chromium, so a
/// missing binary fails the test with the command to run (never skips).
pub fn require_chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.exists(),
            "$CHROMIUM is {} but does not exist",
            p.display()
        );
        return p;
    }
    let path = PathBuf::from("/usr/bin/chromium");
    assert!(
        path.exists(),
        "/usr/bin/chromium is missing: run scripts/setup-system as root \
         (scripts/test does), or set $CHROMIUM"
    );
    path
}
