#!/usr/bin/env node
// The MSC3898 focus client against groupcall's REAL focus: a throwaway
// Synapse, `groupcall focus --config focus.toml` (the binary named by
// --groupcall), N focus clients in headless Chromium and K groupcall
// participants (`groupcall join --focus`) in one call, all through the
// focus. Checks:
//   - every Chromium client is answered (Olm) and its data channel opens;
//   - every Chromium client decodes every other participant's video (>= 30
//     frames) and hears its audio (>= 1 s audible), attributed to the right
//     publisher by the focus's metadata;
//   - every groupcall participant receives every other participant's video
//     (>= 30 frames) and audio (>= 100 frames) (its `media` lines);
//   - the first client leaves: every other client sees its stream go from
//     the focus's metadata, unsubscribes, and is renegotiated without its
//     tracks; the others' media goes on.
//
//   node tools/focus-live.mjs --groupcall PATH/TO/groupcall [--clients N]
//        [--with-groupcall K] [--keep-logs]
// Synapse comes from $SYNAPSE_PYTHON or a venv made by tools/synapse.mjs.
// Prints one JSON line per step; the last is {"check":"focus-live","ok":...}.

import { spawn } from "node:child_process";
import { createWriteStream, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { startSynapse, register, createCallRoom, api, freePort } from "./synapse.mjs";
import { Proc, expectations, sleep } from "./proc.mjs";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const args = process.argv.slice(2);
const arg = (name, dflt) => (args.includes(name) ? args[args.indexOf(name) + 1] : dflt);
const groupcall = arg("--groupcall", null);
const count = Number(arg("--clients", "2"));
const natives = Number(arg("--with-groupcall", "0"));
const keepLogs = args.includes("--keep-logs");
if (!groupcall || !(count >= 1) || !(natives >= 0) || count + natives < 2 || count + natives > 8) {
  process.stderr.write("usage: node tools/focus-live.mjs --groupcall PATH/TO/groupcall [--clients N>=1] [--with-groupcall K] [--keep-logs] (2 <= N+K <= 8)\n");
  process.exit(2);
}
const logDir = mkdtempSync(join(tmpdir(), "groupcall-focus-live-"));
const { out, expect, failures } = expectations();
const NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"];

async function main() {
  const hs = await startSynapse({ log: createWriteStream(join(logDir, "synapse.log")) });
  let focus = null;
  const clients = [];
  const gc = [];
  try {
    const bot = await register(hs.url, "focusbot", "botpw");
    const users = [];
    for (const name of NAMES.slice(0, count + natives)) users.push({ name, ...(await register(hs.url, name, `${name}pw`)) });
    const room = await createCallRoom(hs.url, users[0].access_token, "focus live");
    const confId = `${Date.now()}FocusLiveCall`;
    await api(hs.url, "PUT", `/_matrix/client/v3/rooms/${encodeURIComponent(room)}/state/org.matrix.msc3401.call/${confId}`, {
      token: users[0].access_token, body: { "m.intent": "m.prompt", "m.type": "m.video" },
    });

    // The focus: a new device of the bot, invited by the room's creator.
    const httpPort = await freePort();
    writeFileSync(join(logDir, "focus.toml"), [
      `homeserver = "${hs.url}"`, `user = "${bot.user_id}"`, `password_env = "GROUPCALL_FOCUS_PASSWORD"`,
      `data_dir = "${join(logDir, "focus-data")}"`, `allow = ["localhost"]`, `http_listen = "127.0.0.1:${httpPort}"`,
      `[media]`, `bind = ["127.0.0.1:0"]`, "",
    ].join("\n"));
    focus = spawn(groupcall, ["focus", "--config", join(logDir, "focus.toml")], {
      env: { ...process.env, GROUPCALL_FOCUS_PASSWORD: "botpw" }, stdio: ["ignore", "pipe", "pipe"],
    });
    focus.stdout.pipe(createWriteStream(join(logDir, "focus.stdout.log")));
    focus.stderr.pipe(createWriteStream(join(logDir, "focus.stderr.log")));
    await api(hs.url, "POST", `/_matrix/client/v3/rooms/${encodeURIComponent(room)}/invite`, { token: users[0].access_token, body: { user_id: bot.user_id } });
    let focusDevice = null;
    for (let i = 0; i < 150 && !focusDevice; i++) {
      const { devices } = await api(hs.url, "GET", "/_matrix/client/v3/devices", { token: bot.access_token });
      const member = await api(hs.url, "GET", `/_matrix/client/v3/rooms/${encodeURIComponent(room)}/state/m.room.member/${encodeURIComponent(bot.user_id)}`, { token: users[0].access_token }).catch(() => ({}));
      const device = devices.find((d) => d.device_id !== bot.device_id);
      if (device && member.membership === "join") focusDevice = device.device_id;
      else await sleep(200);
    }
    expect("the focus joined the room", !!focusDevice, { device_id: focusDevice });
    if (!focusDevice) return;

    const t0 = Date.now();
    for (const u of users.slice(0, count)) {
      clients.push(new Proc(u.name, logDir, [join(ROOT, "focus-client.mjs"), "--homeserver", hs.url, "--user", u.name, "--password", `${u.name}pw`,
        "--room", room, "--focus", `${bot.user_id}/${focusDevice}`, "--candidate-ip", "127.0.0.1", "--media-interval", "500", "--log-signalling"]));
    }
    for (const u of users.slice(count)) {
      gc.push(new Proc(u.name, logDir, ["join", "--json", "--homeserver", hs.url, "--user", u.name, "--password", `${u.name}pw`, "--room", room,
        "--focus", `${bot.user_id}/${focusDevice}`, "--data-dir", join(logDir, `${u.name}-data`)], { command: groupcall }));
    }
    const ready = await Promise.all(clients.map((c) => c.waitFor("ready", (e) => e.event === "ready", 60000)));
    // Each user has one device here: a publisher is told by its user id.
    const who = new Map(ready.map((r, i) => [i, { user_id: r.user_id, device_id: r.device_id }]));
    const everyone = [...clients.map((c, i) => ({ name: c.name, user_id: who.get(i).user_id })), ...users.slice(count).map((u) => ({ name: u.name, user_id: u.user_id }))];
    for (const c of clients) {
      const answered = await c.waitFor("answered", (e) => e.event === "call_state" && e.state === "answered", 30000).catch((e) => ({ error: e.message }));
      expect(`${c.name}: answered by the focus over Olm`, answered.encrypted === true && !!answered.focus_session_id, answered);
      const open = await c.waitFor("channel open", (e) => e.event === "channel_open", 20000).catch((e) => ({ error: e.message }));
      expect(`${c.name}: data channel open`, open.label === "m.call", open);
    }
    // Media from every other client, attributed to it.
    const firstMedia = {};
    // Chromium counts audible 10 ms frames, groupcall received audio frames.
    const receivers = [
      ...clients.map((p) => ({ p, audio: "audible", label: (from) => `${p.name} decodes ${from}'s video (>= 30 frames) and hears its audio (>= 1 s audible)` })),
      ...gc.map((p) => ({ p, audio: "frames", label: (from) => `${p.name} (groupcall) receives ${from}'s video (>= 30 frames) and audio (>= 100 frames)` })),
    ];
    for (const { p, audio: audioField, label } of receivers) {
      for (const from of everyone) {
        if (from.name === p.name) continue;
        const of = (kind, field, min) => (e) => e.event === "media" && e.kind === kind && e.user_id === from.user_id && e[field] >= min;
        const video = await p.waitFor("video", of("video", "frames", 30), 40000).catch((e) => ({ error: e.message }));
        const audio = await p.waitFor("audio", of("audio", audioField, 100), 40000).catch((e) => ({ error: e.message }));
        expect(label(from.name), !video.error && !audio.error, { video: video.frames ?? video.error, audio: audio[audioField] ?? audio.error });
        firstMedia[`${from.name}->${p.name}`] = Date.now() - t0;
      }
    }
    out({ step: "media through the focus", ms_since_clients_started: firstMedia });

    // The first client leaves: the others drop its tracks.
    const leaver = clients[0];
    const gone = who.get(0);
    const marks = clients.map((c) => c.events.length);
    const gcMarks = gc.map((g) => g.events.length);
    leaver.send("leave");
    await leaver.waitFor("left", (e) => e.event === "left", 15000);
    const left = Date.now();
    for (const [i, c] of clients.entries()) {
      if (i === 0 || count < 2) continue;
      const since = (pred) => (e) => c.events.indexOf(e) >= marks[i] && pred(e);
      const meta = await c.waitFor("metadata without the leaver", since((e) => e.event === "focus_metadata" && !e.streams.some((s) => s.user_id === gone.user_id && s.device_id === gone.device_id)), 10000).catch((e) => ({ error: e.message }));
      const unsub = await c.waitFor("unsubscribe", since((e) => e.event === "subscription" && e.unsubscribe.length > 0), 10000).catch((e) => ({ error: e.message }));
      const reneg = await c.waitFor("renegotiated without the leaver", since((e) => e.event === "negotiated" && !e.tracks.some((t) => t.user_id === gone.user_id)), 10000).catch((e) => ({ error: e.message }));
      expect(`${c.name}: the leaver's stream leaves the metadata, is unsubscribed and renegotiated away`, !meta.error && !unsub.error && !reneg.error,
        { ms_after_left_line: Date.now() - left, unsubscribe: unsub.unsubscribe?.length ?? unsub.error, reneg: reneg.error ?? "ok" });
    }
    for (const [k, g] of gc.entries()) {
      const removed = await g.waitFor("feed removed", (e) => g.events.indexOf(e) >= gcMarks[k] && e.event === "feed_removed" && e.user_id === gone.user_id, 10000).catch((e) => ({ error: e.message }));
      expect(`${g.name} (groupcall): the leaver's feed is removed`, !removed.error, removed.error ?? { ms_after_left_line: Date.now() - left });
    }
    if (count > 2) {
      // The others still receive each other.
      const [a, b] = [clients[1], clients[2]];
      const ofB = (e) => e.event === "media" && e.kind === "video" && e.user_id === who.get(2).user_id;
      const before = a.events.filter(ofB).at(-1)?.frames ?? 0;
      const more = await a.waitFor("media goes on", (e) => ofB(e) && e.frames >= before + 15, 5000).catch((e) => ({ error: e.message }));
      expect(`${a.name} still decodes ${b.name}'s video after the leave (>= 15 more frames within 5 s)`, !more.error, { before, after: more.frames ?? more.error });
    }
    const metrics = await fetch(`http://127.0.0.1:${httpPort}/metrics`).then((r) => r.text()).catch((e) => String(e));
    writeFileSync(join(logDir, "metrics.txt"), metrics);
    for (const c of clients) c.send("quit");
    for (const g of gc) g.send("leave");
    const exits = await Promise.all([...clients, ...gc].map((c) => c.exited));
    expect("every client exited 0", exits.every((e) => e.code === 0), exits);
  } finally {
    for (const c of [...clients, ...gc]) if (c.proc.exitCode === null) c.proc.kill("SIGTERM");
    if (focus && focus.exitCode === null) {
      focus.kill("SIGTERM");
      await new Promise((r) => focus.once("exit", r));
    }
    await hs.stop();
  }
}

main().then(
  () => {
    out({ check: "focus-live", ok: failures.length === 0, failed: failures, logs: keepLogs || failures.length ? logDir : null });
    if (!keepLogs && failures.length === 0) rmSync(logDir, { recursive: true, force: true });
    process.exit(failures.length === 0 ? 0 : 1);
  },
  (e) => {
    out({ check: "focus-live", ok: false, error: e?.message ?? String(e), logs: logDir });
    process.exit(1);
  },
);
