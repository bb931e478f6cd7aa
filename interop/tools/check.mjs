#!/usr/bin/env node
// End-to-end checks of the reference peer against a throwaway Synapse:
//   node   two Node peers: connect, media both ways, mute, screenshare, leave
//   e2e    two Node peers with --encrypted: signalling arrives Olm-encrypted
//   nocrypto  a Node peer with --no-crypto (no device keys) and one with crypto:
//          media both ways, every m.call.* plaintext
//   mesh   three Node peers in full mesh, one muted and screensharing
//   browser  headless Chromium peer (caller) and a Node peer: media both ways
// and, with --golden, rewrites golden/*.json from the `node` scenario.
//
//   node tools/check.mjs [--only node,e2e,nocrypto,mesh,browser] [--golden] [--keep-logs]
// Synapse comes from $SYNAPSE_PYTHON or a venv made by tools/synapse.mjs.
// Prints one JSON line per scenario with its figures, then "N passed, N failed".

import { spawn } from "node:child_process";
import { createWriteStream, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { startSynapse, register, createCallRoom, api } from "./synapse.mjs";
import { startStunStub } from "./stun-stub.mjs";
import { writeGolden } from "./golden.mjs";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const args = process.argv.slice(2);
const only = args.includes("--only") ? args[args.indexOf("--only") + 1].split(",") : ["node", "e2e", "nocrypto", "mesh", "browser"];
const wantGolden = args.includes("--golden");
const keepLogs = args.includes("--keep-logs");
const logDir = mkdtempSync(join(tmpdir(), "groupcall-check-"));

class Peer {
  constructor(name, script, peerArgs) {
    this.name = name;
    this.events = [];
    this.waiters = new Set();
    this.proc = spawn(process.execPath, [join(ROOT, script), ...peerArgs], { cwd: ROOT, stdio: ["pipe", "pipe", "pipe"] });
    this.proc.stderr.pipe(createWriteStream(join(logDir, `${name}.stderr.log`)));
    const out = createWriteStream(join(logDir, `${name}.jsonl`));
    createInterface({ input: this.proc.stdout }).on("line", (line) => {
      out.write(line + "\n");
      let ev;
      try {
        ev = JSON.parse(line);
      } catch {
        ev = { event: "garbage", line };
      }
      ev._t = Date.now();
      this.events.push(ev);
      if (ev.event === "error") process.stderr.write(`[${name}] error: ${ev.message}\n`);
      this.poke();
    });
    this.exited = new Promise((resolve) => this.proc.on("exit", (code, signal) => resolve({ code, signal })));
    this.exited.then(() => { this.exitedNow = true; this.poke(); });
  }

  poke() {
    for (const w of this.waiters) {
      const ev = this.events.slice(w.from).find(w.pred);
      if (ev) w.resolve(ev);
      else if (this.exitedNow) w.reject(new Error(`${this.name} exited while waiting for ${w.what}`));
      else continue;
      this.waiters.delete(w);
      clearTimeout(w.timer);
    }
  }

  /** Resolve with the first event (at index >= from) matching pred. */
  waitFor(what, pred, { from = 0, timeout = 30000 } = {}) {
    return new Promise((resolve, reject) => {
      const w = { what, pred, from, resolve, reject };
      w.timer = setTimeout(() => {
        this.waiters.delete(w);
        reject(new Error(`${this.name}: timed out after ${timeout} ms waiting for ${what}`));
      }, timeout);
      this.waiters.add(w);
      this.poke();
    });
  }

  get mark() { return this.events.length; }

  send(line) { this.proc.stdin.write(line + "\n"); }

  async quit(timeout = 20000) {
    this.proc.stdin.end(); // end of stdin = quit, leaving the call cleanly
    let timer;
    const result = await Promise.race([this.exited, new Promise((r) => { timer = setTimeout(() => r(null), timeout); })]);
    clearTimeout(timer);
    if (!result) {
      this.proc.kill("SIGKILL");
      throw new Error(`${this.name} did not exit within ${timeout} ms`);
    }
    if (result.code !== 0) throw new Error(`${this.name} exited with ${result.code ?? result.signal}`);
    return result;
  }

  kill() { if (!this.exitedNow) this.proc.kill("SIGKILL"); }
}

const isMedia = (from, kind, purpose = "m.usermedia") => (e) =>
  e.event === "media" && e.user_id === from && e.kind === kind && e.purpose === purpose && e.frames > 0;

/** Received frames per second of one track kind from `from`, over ~5 s of reports. */
async function measureFps(peer, from, kind, purpose) {
  const first = await peer.waitFor(`${kind} frames from ${from}`, isMedia(from, kind, purpose));
  const later = await peer.waitFor(`5 s of ${kind} frames`, (e) => isMedia(from, kind, purpose)(e) && e.track_id === first.track_id && e._t - first._t >= 5000, { timeout: 15000 });
  return Math.round(((later.frames - first.frames) * 1000) / (later._t - first._t) * 10) / 10;
}

let hs;
async function newRoom(names) {
  const stamp = Date.now().toString(36);
  const users = {};
  for (const n of names) users[n] = await register(hs.url, `${n}-${stamp}`, "secret-pw");
  const room = await createCallRoom(hs.url, users[names[0]].access_token);
  return { room, users, stamp };
}

function peerArgs({ room }, user, extra = []) {
  return ["--homeserver", hs.url, "--user", user.user_id, "--password", "secret-pw", "--room", room, ...extra];
}

// ---- scenarios -------------------------------------------------------------

async function scenarioNode(peers) {
  const stun = await startStunStub(); // makes the caller trickle m.call.candidates
  try {
    const r = await newRoom(["alice", "bob"]);
    const A = r.users.alice.user_id;
    const B = r.users.bob.user_id;
    const alice = new Peer("node-alice", "peer.mjs", peerArgs(r, r.users.alice, ["--create-call", "--log-signalling", "--ice-server", stun.uri]));
    peers.push(alice);
    await alice.waitFor("joined", (e) => e.event === "joined");
    const bob = new Peer("node-bob", "peer.mjs", peerArgs(r, r.users.bob, ["--log-signalling", "--ice-server", stun.uri]));
    peers.push(bob);
    const bobJoined = await bob.waitFor("joined", (e) => e.event === "joined");
    const connected = (p, other) => p.waitFor(`connected to ${other}`, (e) => e.event === "call_state" && e.user_id === other && e.state === "connected");
    const [ca, cb] = await Promise.all([connected(alice, B), connected(bob, A)]);
    const [fa, fb] = await Promise.all([alice.waitFor("video from bob", isMedia(B, "video")), bob.waitFor("video from alice", isMedia(A, "video"))]);
    const fps = Object.fromEntries(await Promise.all([
      ["alice_audio_from_bob", alice, B, "audio"], ["alice_video_from_bob", alice, B, "video"],
      ["bob_audio_from_alice", bob, A, "audio"], ["bob_video_from_alice", bob, A, "video"],
    ].map(async ([k, p, from, kind]) => [k, await measureFps(p, from, kind)])));

    // mute / unmute, seen by the other side as feed_muted
    const muted = {};
    for (const [cmd, field, value] of [
      ["mute audio", "audio_muted", true], ["unmute audio", "audio_muted", false],
      ["mute video", "video_muted", true], ["unmute video", "video_muted", false],
    ]) {
      const from = alice.mark;
      const t0 = Date.now();
      bob.send(cmd);
      await alice.waitFor(`feed_muted ${field}=${value}`, (e) => e.event === "feed_muted" && e.user_id === B && e[field] === value, { from });
      muted[cmd] = Date.now() - t0;
    }
    const afterUnmute = alice.mark;
    await alice.waitFor("video again after unmute", (e) => isMedia(B, "video")(e), { from: afterUnmute });

    // screenshare: a second feed with purpose m.screenshare
    let from = alice.mark;
    let t0 = Date.now();
    bob.send("screenshare on");
    const ss = await alice.waitFor("screenshare feed", (e) => e.event === "feed_added" && e.user_id === B && e.purpose === "m.screenshare", { from });
    const ssAdded = Date.now() - t0;
    await alice.waitFor("screenshare frames", isMedia(B, "video", "m.screenshare"), { from });
    const ssFps = await measureFps(alice, B, "video", "m.screenshare");
    from = alice.mark;
    bob.send("screenshare off");
    await alice.waitFor("screenshare removed", (e) => e.event === "feed_removed" && e.user_id === B && e.purpose === "m.screenshare", { from });

    // leaving: bob hangs up and clears his member state
    from = alice.mark;
    await bob.quit();
    await alice.waitFor("call ended", (e) => e.event === "call_state" && e.user_id === B && e.state === "ended", { from });
    await alice.waitFor("bob's member state cleared", (e) => e.event === "state" && e.state_key === B && e.content["m.calls"]?.length === 0, { from });
    from = alice.mark;
    alice.send("terminate");
    await alice.waitFor("call terminated", (e) => e.event === "state" && e.type === "org.matrix.msc3401.call" && e.content["m.terminated"], { from });
    await alice.quit();

    if (wantGolden) {
      const files = writeGolden(join(ROOT, "golden"), { alice, bob, A, B });
      process.stderr.write(`golden files written: ${files.join(", ")}\n`);
    }
    return {
      connect_ms: { alice: ca._t - bobJoined._t, bob: cb._t - bobJoined._t },
      first_video_ms: { alice: fa._t - bobJoined._t, bob: fb._t - bobJoined._t },
      fps, mute_seen_ms: muted, screenshare_added_ms: ssAdded, screenshare_fps: ssFps,
      screenshare_stream: ss.stream_id,
    };
  } finally {
    stun.stop();
  }
}

async function scenarioE2e(peers) {
  const r = await newRoom(["erin", "frank"]);
  const E = r.users.erin.user_id;
  const F = r.users.frank.user_id;
  const erin = new Peer("e2e-erin", "peer.mjs", peerArgs(r, r.users.erin, ["--create-call", "--encrypted", "--log-signalling"]));
  peers.push(erin);
  await erin.waitFor("joined", (e) => e.event === "joined");
  const frank = new Peer("e2e-frank", "peer.mjs", peerArgs(r, r.users.frank, ["--encrypted", "--log-signalling"]));
  peers.push(frank);
  const joined = await frank.waitFor("joined", (e) => e.event === "joined");
  const [ce] = await Promise.all([
    erin.waitFor("connected", (e) => e.event === "call_state" && e.user_id === F && e.state === "connected"),
    frank.waitFor("connected", (e) => e.event === "call_state" && e.user_id === E && e.state === "connected"),
  ]);
  await Promise.all([erin.waitFor("audio", isMedia(F, "audio")), erin.waitFor("video", isMedia(F, "video")),
    frank.waitFor("audio", isMedia(E, "audio")), frank.waitFor("video", isMedia(E, "video"))]);
  let from = erin.mark;
  frank.send("mute audio");
  await erin.waitFor("feed_muted", (e) => e.event === "feed_muted" && e.user_id === F && e.audio_muted === true, { from });
  from = erin.mark;
  await frank.quit();
  await erin.waitFor("hangup", (e) => e.event === "signalling" && e.direction === "in" && e.type === "m.call.hangup", { from });
  await erin.quit();

  const received = [...erin.events, ...frank.events].filter((e) => e.event === "signalling" && e.direction === "in");
  const plaintext = received.filter((e) => !e.encrypted);
  if (plaintext.length > 0) throw new Error(`plaintext m.call.* received: ${plaintext.map((e) => e.type).join(", ")}`);
  const types = [...new Set(received.map((e) => e.type))].sort();
  for (const t of ["m.call.invite", "m.call.answer", "m.call.select_answer", "m.call.sdp_stream_metadata_changed", "m.call.hangup"]) {
    if (!types.includes(t)) throw new Error(`no encrypted ${t} seen`);
  }
  return { connect_ms: ce._t - joined._t, encrypted_types_received: types, encrypted_messages: received.length };
}

async function scenarioNoCrypto(peers) {
  // gail has no crypto (no device keys), hugo has: gail calls hugo.
  const r = await newRoom(["gail", "hugo"]);
  const G = r.users.gail.user_id;
  const H = r.users.hugo.user_id;
  const gail = new Peer("nocrypto-gail", "peer.mjs", peerArgs(r, r.users.gail, ["--create-call", "--no-crypto", "--log-signalling"]));
  peers.push(gail);
  const gailReady = await gail.waitFor("ready", (e) => e.event === "ready");
  if (gailReady.crypto !== false) throw new Error(`--no-crypto peer reports crypto ${gailReady.crypto}`);
  await gail.waitFor("joined", (e) => e.event === "joined");
  const hugo = new Peer("nocrypto-hugo", "peer.mjs", peerArgs(r, r.users.hugo, ["--log-signalling"]));
  peers.push(hugo);
  const hugoReady = await hugo.waitFor("ready", (e) => e.event === "ready");
  const joined = await hugo.waitFor("joined", (e) => e.event === "joined");
  const [cg] = await Promise.all([
    gail.waitFor("connected", (e) => e.event === "call_state" && e.user_id === H && e.state === "connected"),
    hugo.waitFor("connected", (e) => e.event === "call_state" && e.user_id === G && e.state === "connected"),
  ]);
  const fps = Object.fromEntries(await Promise.all([
    ["gail_audio_from_hugo", gail, H, "audio"], ["gail_video_from_hugo", gail, H, "video"],
    ["hugo_audio_from_gail", hugo, G, "audio"], ["hugo_video_from_gail", hugo, G, "video"],
  ].map(async ([k, p, from, kind]) => [k, await measureFps(p, from, kind)])));
  // The homeserver has keys for hugo's device, none for gail's.
  const keys = await api(hs.url, "POST", "/_matrix/client/v3/keys/query", {
    token: r.users.hugo.access_token, body: { device_keys: { [G]: [], [H]: [] } },
  });
  if (keys.device_keys?.[G]?.[gailReady.device_id]) throw new Error("the --no-crypto peer published device keys");
  if (!keys.device_keys?.[H]?.[hugoReady.device_id]) throw new Error("the peer with crypto published no device keys");
  await gail.quit();
  await hugo.quit();
  const received = [...gail.events, ...hugo.events].filter((e) => e.event === "signalling" && e.direction === "in");
  const encrypted = received.filter((e) => e.encrypted);
  if (encrypted.length > 0) throw new Error(`encrypted to-device received: ${encrypted.map((e) => e.type).join(", ")}`);
  if (!received.some((e) => e.type === "m.call.invite") || !received.some((e) => e.type === "m.call.answer")) {
    throw new Error("no plaintext invite/answer seen");
  }
  return { connect_ms: cg._t - joined._t, plaintext_messages: received.length, fps };
}

async function scenarioBrowser(peers) {
  // The browser's user id sorts first, so the browser places the call.
  const r = await newRoom(["carol", "dave"]);
  const C = r.users.carol.user_id;
  const D = r.users.dave.user_id;
  const dave = new Peer("browser-node-dave", "peer.mjs", peerArgs(r, r.users.dave, ["--create-call", "--log-signalling"]));
  peers.push(dave);
  await dave.waitFor("joined", (e) => e.event === "joined");
  const carol = new Peer("browser-carol", "browser.mjs", peerArgs(r, r.users.carol, ["--log-signalling"]));
  peers.push(carol);
  const joined = await carol.waitFor("joined", (e) => e.event === "joined", { timeout: 60000 });
  const [cc, cd] = await Promise.all([
    carol.waitFor("connected", (e) => e.event === "call_state" && e.user_id === D && e.state === "connected"),
    dave.waitFor("connected", (e) => e.event === "call_state" && e.user_id === C && e.state === "connected"),
  ]);
  const fps = Object.fromEntries(await Promise.all([
    ["browser_audio_from_node", carol, D, "audio"], ["browser_video_from_node", carol, D, "video"],
    ["node_audio_from_browser", dave, C, "audio"], ["node_video_from_browser", dave, C, "video"],
  ].map(async ([k, p, from, kind]) => [k, await measureFps(p, from, kind)])));
  let from = dave.mark;
  carol.send("screenshare on");
  await dave.waitFor("browser screenshare", (e) => e.event === "feed_added" && e.user_id === C && e.purpose === "m.screenshare", { from });
  await dave.waitFor("browser screenshare frames", isMedia(C, "video", "m.screenshare"), { from });
  from = dave.mark;
  carol.send("mute video");
  await dave.waitFor("browser video muted", (e) => e.event === "feed_muted" && e.user_id === C && e.video_muted === true, { from });
  from = dave.mark;
  await carol.quit();
  await dave.waitFor("call ended", (e) => e.event === "call_state" && e.user_id === C && e.state === "ended", { from });
  await dave.quit();
  return { caller: "browser", connect_ms: { browser: cc._t - joined._t, node: cd._t - joined._t }, fps };
}

async function scenarioMesh(peers) {
  // Three Node peers in full mesh; the last enters muted and screensharing.
  const r = await newRoom(["gina", "hank", "ivy"]);
  const ids = Object.fromEntries(Object.entries(r.users).map(([n, u]) => [n, u.user_id]));
  const started = {};
  for (const [name, extra] of [["gina", ["--create-call"]], ["hank", []], ["ivy", ["--mute-audio", "--screenshare"]]]) {
    const p = new Peer(`mesh-${name}`, "peer.mjs", peerArgs(r, r.users[name], extra));
    peers.push(p);
    started[name] = p;
    await p.waitFor("joined", (e) => e.event === "joined");
  }
  const t0 = Date.now();
  const waits = [];
  for (const [name, p] of Object.entries(started)) {
    for (const other of Object.keys(started).filter((o) => o !== name)) {
      waits.push(p.waitFor(`${other}'s video`, isMedia(ids[other], "video")));
      if (other !== "ivy") waits.push(p.waitFor(`${other}'s audio`, isMedia(ids[other], "audio")));
    }
    if (name !== "ivy") {
      waits.push(p.waitFor("ivy muted", (e) => e.event === "feed_added" && e.user_id === ids.ivy && e.purpose === "m.usermedia" && e.audio_muted));
      waits.push(p.waitFor("ivy's screen", isMedia(ids.ivy, "video", "m.screenshare")));
    }
  }
  await Promise.all(waits);
  const allMedia = Date.now() - t0;
  for (const p of Object.values(started)) await p.quit();
  return { peers: 3, all_media_ms: allMedia };
}

// ---- main --------------------------------------------------------------------

const scenarios = { node: scenarioNode, e2e: scenarioE2e, nocrypto: scenarioNoCrypto, browser: scenarioBrowser, mesh: scenarioMesh };
let passed = 0;
let failed = 0;
try {
  hs = await startSynapse({ log: createWriteStream(join(logDir, "synapse.log")) });
  for (const name of only) {
    const peers = [];
    const t0 = Date.now();
    try {
      const figures = await scenarios[name](peers);
      passed++;
      console.log(JSON.stringify({ scenario: name, ok: true, seconds: (Date.now() - t0) / 1000, ...figures }));
    } catch (e) {
      failed++;
      console.log(JSON.stringify({ scenario: name, ok: false, error: e.message, logs: logDir }));
    } finally {
      for (const p of peers) p.kill();
    }
  }
} finally {
  await hs?.stop();
}
if (failed === 0 && !keepLogs) rmSync(logDir, { recursive: true, force: true });
else console.error(`logs kept in ${logDir}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
