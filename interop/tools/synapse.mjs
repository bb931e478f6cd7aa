#!/usr/bin/env node
// A throwaway Synapse on a free loopback port, for checking the peer by hand
// and for tools/check.mjs. (The project's tests have their own harness.)
//
//   node tools/synapse.mjs [--python /path/to/venv/bin/python]
// prints {"event":"synapse","url":...} and runs until SIGTERM / Ctrl-C.
// Without --python it uses $SYNAPSE_PYTHON, else creates a venv under
// /tmp/groupcall-interop-synapse-venv and pip-installs matrix-synapse there.

import { spawn, execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

const DEFAULT_VENV = "/tmp/groupcall-interop-synapse-venv";
const BIG = { per_second: 10000, burst_count: 100000 };

export function ensureSynapsePython(python = process.env.SYNAPSE_PYTHON) {
  if (python) return python;
  const venvPython = join(DEFAULT_VENV, "bin", "python");
  if (!existsSync(venvPython)) {
    execFileSync("python3", ["-m", "venv", DEFAULT_VENV], { stdio: "inherit" });
  }
  try {
    execFileSync(venvPython, ["-c", "import synapse"], { stdio: "ignore" });
  } catch {
    execFileSync(venvPython, ["-m", "pip", "install", "-q", "matrix-synapse"], { stdio: "inherit" });
  }
  return venvPython;
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function overrides(port) {
  const limits = Object.fromEntries([
    "rc_message", "rc_registration", "rc_joins", "rc_invites", "rc_3pid_validation",
    "rc_admin_redaction", "rc_key_requests", "rc_room_creation", "rc_reports",
    "rc_registration_token_validity", "rc_media_create", "rc_delayed_event_mgmt",
  ].map((k) => [k, BIG]));
  return {
    listeners: [{ port, bind_addresses: ["127.0.0.1"], type: "http", tls: false, x_forwarded: false, resources: [{ names: ["client"], compress: false }] }],
    ...limits,
    rc_login: { address: BIG, account: BIG, failed_attempts: BIG },
    rc_joins: { local: BIG, remote: BIG },
    rc_invites: { per_room: BIG, per_user: BIG, per_issuer: BIG },
    rc_federation: { window_size: 1000, sleep_limit: 1000, sleep_delay: 1, reject_limit: 1000, concurrent: 1000 },
    caches: { sync_response_cache_duration: 0 },
    enable_registration: true,
    enable_registration_without_verification: true,
    presence: { enabled: false },
    trusted_key_servers: [],
    federation_domain_whitelist: [],
    report_stats: false,
  };
}

export async function startSynapse({ python, log = process.stderr, extraConfig = {} } = {}) {
  python = ensureSynapsePython(python);
  const dir = mkdtempSync(join(tmpdir(), "groupcall-synapse-"));
  const config = join(dir, "homeserver.yaml");
  execFileSync(python, ["-m", "synapse.app.homeserver", "--server-name", "localhost", "--config-path", config,
    "--data-directory", dir, "--generate-config", "--report-stats=no"], { cwd: dir, stdio: "ignore" });
  const port = await freePort();
  // Merge our settings into the generated config with Synapse's own PyYAML.
  const merge = "import json, sys, yaml\n" +
    "c = yaml.safe_load(open(sys.argv[1]))\n" +
    "c.update(json.loads(sys.argv[2]))\n" +
    "yaml.safe_dump(c, open(sys.argv[1], 'w'))\n";
  execFileSync(python, ["-c", merge, config, JSON.stringify({ ...overrides(port), ...extraConfig })]);

  const proc = spawn(python, ["-m", "synapse.app.homeserver", "--config-path", config], { cwd: dir, stdio: ["ignore", "pipe", "pipe"] });
  proc.stdout.pipe(log, { end: false });
  proc.stderr.pipe(log, { end: false });
  const url = `http://127.0.0.1:${port}`;
  const exited = new Promise((resolve) => proc.once("exit", resolve));
  const deadline = Date.now() + 60000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`synapse exited with ${proc.exitCode}; config in ${config}`);
    try {
      const res = await fetch(`${url}/_matrix/client/versions`);
      if (res.ok) break;
    } catch { /* not up yet */ }
    if (Date.now() > deadline) {
      proc.kill("SIGTERM");
      throw new Error("synapse did not come up within 60 s");
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  const stop = async () => {
    if (proc.exitCode === null) proc.kill("SIGTERM");
    await exited;
    rmSync(dir, { recursive: true, force: true });
  };
  return { url, dir, stop };
}

// ---- small client-server helpers for scenarios -------------------------

export async function api(url, method, path, { token, body } = {}) {
  const res = await fetch(url + path, {
    method,
    headers: { "content-type": "application/json", ...(token ? { authorization: `Bearer ${token}` } : {}) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = new Error(`${method} ${path}: ${res.status} ${JSON.stringify(json)}`);
    err.status = res.status;
    err.body = json;
    throw err;
  }
  return json;
}

/** Register (m.login.dummy) and return { user_id, access_token, device_id }. */
export async function register(url, username, password) {
  const body = { username, password, auth: { type: "m.login.dummy" }, inhibit_login: false };
  try {
    return await api(url, "POST", "/_matrix/client/v3/register", { body });
  } catch (e) {
    if (e.status === 401 && e.body.session) {
      return api(url, "POST", "/_matrix/client/v3/register", { body: { ...body, auth: { ...body.auth, session: e.body.session } } });
    }
    throw e;
  }
}

/** A public room whose members may send MSC3401 call and member state. */
export async function createCallRoom(url, token, name = "groupcall interop") {
  const { room_id } = await api(url, "POST", "/_matrix/client/v3/createRoom", {
    token,
    body: {
      name, preset: "public_chat", visibility: "private",
      power_level_content_override: {
        events: { "org.matrix.msc3401.call": 0, "org.matrix.msc3401.call.member": 0 },
      },
    },
  });
  return room_id;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const i = process.argv.indexOf("--python");
  const hs = await startSynapse({ python: i > 0 ? process.argv[i + 1] : undefined });
  process.stdout.write(JSON.stringify({ event: "synapse", url: hs.url, dir: hs.dir }) + "\n");
  const quit = () => hs.stop().then(() => process.exit(0));
  process.on("SIGTERM", quit);
  process.on("SIGINT", quit);
}
