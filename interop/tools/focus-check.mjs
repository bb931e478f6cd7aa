#!/usr/bin/env node
// A check of the MSC3898 focus client (focus-client.mjs) without a real
// focus: a throwaway Synapse, the client in headless Chromium, and a STUB
// focus here in Node (matrix-js-sdk with Rust crypto for Matrix, @roamhq/wrtc
// for WebRTC). The stub is not groupcall's focus: it plays the focus's part
// of the protocol just far enough to exercise the client:
//   - it receives the client's invite (Olm-encrypted, decrypted here) and
//     checks its fields and the client's member entry (foci lists);
//   - answers (Olm) with its own session, which the client must then use as
//     dest_session_id (checked on select_answer and later messages);
//   - on the client's data channel: pings (the client must pong), sends the
//     call's metadata (the client's own stream, which it must not subscribe
//     to, and one of a made-up publisher @other:localhost/OTHERDEV with
//     synthetic audio and video), expects a track_subscription to exactly
//     the other publisher's two tracks, then offers them with
//     m.call.negotiate and applies the client's answer;
//   - counts the client's audio and video arriving at the stub (decoded by
//     libwebrtc in Node) while the client reports decoded frames of the
//     other publisher's video and audible audio, attributed to it.
// Then the client leaves: a hangup reaches the stub and the member entry is
// gone.
//
//   node tools/focus-check.mjs [--keep-logs]
// Synapse comes from $SYNAPSE_PYTHON or a venv made by tools/synapse.mjs.
// Prints one JSON line per step; the last is {"check":"focus","ok":...}.

import { createWriteStream, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { Console } from "node:console";
import { startSynapse, register, createCallRoom, api } from "./synapse.mjs";
import { Proc, expectations, sleep } from "./proc.mjs";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const keepLogs = process.argv.includes("--keep-logs");
const logDir = mkdtempSync(join(tmpdir(), "groupcall-focus-check-"));
// The stub's SDK and crypto log go to a file; stdout carries our lines only.
const stubLog = createWriteStream(join(logDir, "stub-focus.log"));
globalThis.console = new Console({ stdout: stubLog, stderr: stubLog });
const { SyntheticMedia, countFrames, polyfillWithResolvers } = await import("../src/node-platform.mjs");
polyfillWithResolvers(); // before the SDK is loaded
const sdk = await import("matrix-js-sdk");
const { default: wrtc } = await import("@roamhq/wrtc");
const { CallEncryptor, startAndSync } = await import("../src/peer-core.mjs");
const { sdpSections } = await import("../src/focus-helpers.mjs");

const { out, expect, failures } = expectations();

/** The stub focus: a Matrix device that answers one client's calls. */
async function startStubFocus(url, creds, confId) {
  const client = sdk.createClient({ baseUrl: url, userId: creds.user_id, deviceId: creds.device_id, accessToken: creds.access_token, disableVoip: true });
  await client.initRustCrypto({ useIndexedDB: false });
  await startAndSync(client, sdk);
  const encryptor = new CallEncryptor(client);
  const media = new SyntheticMedia();
  const other = media.makeStream({ audio: true, video: true }); // @other's stream
  const session = "STUBFOCUSSESSION";
  const state = {
    invites: [], received: [], channel: [], pongs: 0, subscriptions: [], negotiated: false,
    counters: new Map(), call: null, hangups: [], otherStream: other,
  };
  let seq = 0;
  const sendToClient = (call, type, body) => {
    const content = { ...body, version: "1", call_id: call.callId, party_id: creds.device_id, conf_id: confId, device_id: creds.device_id, sender_session_id: session, dest_session_id: call.clientSession, seq: seq++ };
    const map = new Map([[call.user, new Map([[call.device, content]])]]);
    return encryptor.send(type, map, (t, m) => client.sendToDevice(t, m));
  };
  const sendChannel = (type, content) => state.call?.dc?.readyState === "open" && state.call.dc.send(JSON.stringify({ type, content }));

  client.on(sdk.ClientEvent.ReceivedToDeviceMessage, async ({ message, encryptionInfo }) => {
    if (!message.type?.startsWith("m.call.")) return;
    const c = message.content;
    state.received.push({ type: message.type, encrypted: encryptionInfo != null, sender: message.sender, sender_device: encryptionInfo?.senderDevice ?? null, content: c });
    if (message.type === "m.call.hangup") state.hangups.push(c);
    if (message.type !== "m.call.invite") return;
    state.invites.push({ content: c, encrypted: encryptionInfo != null, sender_device: encryptionInfo?.senderDevice ?? null });
    if (state.call) return; // only the first call is answered
    const pc = new wrtc.RTCPeerConnection({ iceServers: [] });
    const call = { callId: c.call_id, user: message.sender, device: encryptionInfo?.senderDevice ?? c.device_id, clientSession: c.sender_session_id, pc, dc: null };
    state.call = call;
    pc.ontrack = (ev) => state.counters.set(ev.track.kind, countFrames(ev.track));
    pc.ondatachannel = (ev) => {
      call.dc = ev.channel;
      state.label = ev.channel.label;
      ev.channel.onmessage = (m) => onChannel(JSON.parse(m.data));
      const opened = () => {
        state.channelOpen = true;
        call.pinger = setInterval(() => sendChannel("m.call.ping", {}), 500);
        // The call's streams: the client's own (from its invite's metadata,
        // which it must skip) and @other's.
        const own = Object.keys(c.sdp_stream_metadata ?? {})[0];
        const meta = {
          [own]: { purpose: "m.usermedia", audio_muted: false, video_muted: false, user_id: call.user, device_id: call.device, tracks: c.sdp_stream_metadata?.[own]?.tracks ?? {} },
          [other.id]: { purpose: "m.usermedia", audio_muted: false, video_muted: false, user_id: "@other:localhost", device_id: "OTHERDEV", tracks: Object.fromEntries(other.getTracks().map((t) => [t.id, {}])) },
        };
        state.meta = meta;
        sendChannel("m.call.sdp_stream_metadata_changed", { sdp_stream_metadata: meta });
      };
      if (ev.channel.readyState === "open") opened(); else ev.channel.onopen = opened;
    };
    const onChannel = async (msg) => {
      state.channel.push(msg);
      if (msg.type === "m.call.pong") state.pongs++;
      if (msg.type === "m.call.track_subscription") {
        state.subscriptions.push(msg.content);
        for (const t of other.getTracks()) pc.addTrack(t, other);
        await pc.setLocalDescription(await pc.createOffer());
        sendChannel("m.call.negotiate", {
          description: { type: "offer", sdp: pc.localDescription.sdp },
          sdp_stream_metadata: { [other.id]: state.meta[other.id] },
        });
      }
      if (msg.type === "m.call.negotiate" && msg.content?.description?.type === "answer") {
        await pc.setRemoteDescription(msg.content.description);
        state.negotiated = true;
      }
    };
    await pc.setRemoteDescription(c.offer);
    await pc.setLocalDescription(await pc.createAnswer());
    await new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && resolve();
      setTimeout(resolve, 2000);
    });
    await sendToClient(call, "m.call.answer", { answer: { type: "answer", sdp: pc.localDescription.sdp }, sdp_stream_metadata: {} });
  });
  const stop = () => {
    clearInterval(state.call?.pinger);
    state.call?.pc.close();
    for (const c of state.counters.values()) c.stop();
    media.stop();
    client.stopClient();
  };
  return { state, stop, session };
}

async function main() {
  const hs = await startSynapse({ log: createWriteStream(join(logDir, "synapse.log")) });
  let client = null;
  let stub = null;
  try {
    const alice = await register(hs.url, "alice", "alicepw");
    const bot = await register(hs.url, "focusbot", "botpw");
    const room = await createCallRoom(hs.url, alice.access_token, "focus check");
    const confId = `${Date.now()}FocusCheckCall`;
    await api(hs.url, "PUT", `/_matrix/client/v3/rooms/${encodeURIComponent(room)}/state/org.matrix.msc3401.call/${confId}`, {
      token: alice.access_token, body: { "m.intent": "m.prompt", "m.type": "m.video" },
    });
    stub = await startStubFocus(hs.url, bot, confId);
    out({ step: "stub focus up", user_id: bot.user_id, device_id: bot.device_id });

    const t0 = Date.now();
    client = new Proc("focus-client", logDir, [join(ROOT, "focus-client.mjs"), "--homeserver", hs.url, "--user", "alice", "--password", "alicepw",
      "--room", room, "--focus", `${bot.user_id}/${bot.device_id}`, "--media-interval", "500", "--candidate-ip", "127.0.0.1", "--ping-timeout", "1500", "--log-signalling"]);
    const ready = await client.waitFor("ready", (e) => e.event === "ready", 60000);
    const joined = await client.waitFor("joined", (e) => e.event === "joined", 30000);
    expect("joined the room's call", joined.call_id === confId, { call_id: joined.call_id });

    // The member entry, as the homeserver has it.
    const member = await api(hs.url, "GET", `/_matrix/client/v3/rooms/${encodeURIComponent(room)}/state/org.matrix.msc3401.call.member/${encodeURIComponent(ready.user_id)}`, { token: alice.access_token });
    out({ step: "member event", content: member });
    const dev = member["m.calls"]?.find((c) => c["m.call_id"] === confId)?.["m.devices"]?.find((d) => d.device_id === ready.device_id);
    const namesFocus = (list) => Array.isArray(list) && list.length === 1 && list[0].user_id === bot.user_id && list[0].device_id === bot.device_id;
    expect("member entry: device, session, expiry, feeds", dev && dev.session_id === ready.session_id && dev.expires_ts > Date.now() && dev.feeds?.[0]?.purpose === "m.usermedia");
    for (const key of ["m.foci.active", "org.matrix.msc3898.foci.active", "m.foci.preferred", "org.matrix.msc3898.foci.preferred"]) {
      expect(`member entry: ${key} names the focus`, namesFocus(dev?.[key]));
    }

    // The invite, decrypted at the stub.
    for (let i = 0; i < 300 && stub.state.invites.length === 0; i++) await sleep(100);
    const inv = stub.state.invites[0];
    out({ step: "invite received by the stub focus", encrypted: inv?.encrypted, sender_device: inv?.sender_device, content: inv && { ...inv.content, offer: { type: inv.content.offer?.type, sdp_length: inv.content.offer?.sdp?.length } } });
    const c = inv?.content ?? {};
    const sections = [...sdpSections(c.offer?.sdp).values()];
    expect("invite arrived Olm-encrypted from the client's device", inv?.encrypted && inv.sender_device === ready.device_id);
    expect("invite group fields", c.version === "1" && c.conf_id === confId && c.party_id === ready.device_id && c.device_id === ready.device_id &&
      c.sender_session_id === ready.session_id && c.seq === 0 && typeof c.call_id === "string" && c.lifetime > 0 && c.invitee === bot.user_id);
    expect("invite dest_session_id is the focus's device id", c.dest_session_id === bot.device_id);
    expect("offer: sendrecv audio and video and a data channel", c.offer?.type === "offer" &&
      sections.some((s) => s.kind === "audio" && s.direction === "sendrecv") && sections.some((s) => s.kind === "video" && s.direction === "sendrecv") &&
      sections.some((s) => s.kind === "application"));
    const own = Object.keys(c.sdp_stream_metadata ?? {});
    expect("sdp_stream_metadata keyed by the offer's msid stream, m.usermedia with its tracks", own.length === 1 &&
      sections.filter((s) => s.stream_id).every((s) => s.stream_id === own[0] && c.sdp_stream_metadata[own[0]].tracks?.[s.track_id]) &&
      c.sdp_stream_metadata[own[0]].purpose === "m.usermedia");

    // The room state the focus would authorise the invite from (kept with
    // --keep-logs for checking against groupcall's focus core).
    const roomState = await api(hs.url, "GET", `/_matrix/client/v3/rooms/${encodeURIComponent(room)}/state`, { token: alice.access_token });
    writeFileSync(join(logDir, "room-state.json"), JSON.stringify({ room_id: room, focus_device: bot.device_id, client_user: ready.user_id, client_device: ready.device_id, state: roomState }, null, 1));

    // select_answer and later messages go to the focus's session.
    await client.waitFor("answered", (e) => e.event === "call_state" && e.state === "answered", 20000);
    for (let i = 0; i < 100 && !stub.state.received.some((m) => m.type === "m.call.select_answer"); i++) await sleep(100);
    const sel = stub.state.received.find((m) => m.type === "m.call.select_answer");
    expect("select_answer (Olm) to the focus's session, selecting the focus device", sel?.encrypted && sel.content.dest_session_id === stub.session &&
      sel.content.selected_party_id === bot.device_id, sel?.content);

    await client.waitFor("channel open", (e) => e.event === "channel_open", 20000);
    for (let i = 0; i < 50 && !stub.state.label; i++) await sleep(100); // the stub's side may open a little later
    expect("data channel label m.call", stub.state.label === "m.call", stub.state.label);
    await client.waitFor("subscription", (e) => e.event === "subscription", 10000);
    await sleep(300);
    const sub = stub.state.subscriptions[0];
    const otherTracks = stub.state.otherStream.getTracks().map((t) => t.id).sort();
    expect("subscribed to exactly the other publisher's tracks", sub && sub.unsubscribe?.length === 0 &&
      JSON.stringify(sub.subscribe.map((s) => s.stream_id === stub.state.otherStream.id && s.track_id).sort()) === JSON.stringify(otherTracks), sub);
    await client.waitFor("negotiated", (e) => e.event === "negotiated", 10000);

    // Media: the other's video decoded and its audio audible at the client,
    // attributed to @other; the client's audio and video at the stub.
    const video = await client.waitFor("other's video decoded", (e) => e.event === "media" && e.kind === "video" && e.frames >= 30, 30000).catch((e) => ({ error: e.message }));
    const audio = await client.waitFor("other's audio audible", (e) => e.event === "media" && e.kind === "audio" && e.audible >= 50, 30000).catch((e) => ({ error: e.message }));
    expect("client decoded the other publisher's video (>= 30 frames), attributed to @other:localhost/OTHERDEV", video.user_id === "@other:localhost" && video.device_id === "OTHERDEV" && video.stream_id === stub.state.otherStream.id, video);
    expect("client heard the other publisher's audio (>= 0.5 s audible), attributed to it", audio.user_id === "@other:localhost" && audio.device_id === "OTHERDEV", audio);
    for (let i = 0; i < 100 && !((stub.state.counters.get("video")?.read() ?? 0) >= 30 && (stub.state.counters.get("audio")?.audible() ?? 0) >= 50); i++) await sleep(100);
    const atStub = { video_frames: stub.state.counters.get("video")?.read() ?? 0, audio_audible: stub.state.counters.get("audio")?.audible?.() ?? 0 };
    expect("stub decoded the client's video (>= 30 frames) and audible audio (>= 50 frames)", atStub.video_frames >= 30 && atStub.audio_audible >= 50, atStub);
    const sent = client.events.filter((e) => e.event === "sent").at(-1);
    expect("client reports its own outbound packets", sent?.audio?.packets > 0 && sent?.video?.packets > 0, sent);
    expect("client answered pings with pongs", stub.state.pongs >= 2, { pongs: stub.state.pongs });
    out({ step: "media", ms_since_client_start: Date.now() - t0, at_client: { video: video.frames, audio_audible: audio.audible }, at_stub: atStub });

    // Mute: the focus hears of it on the channel.
    const before = stub.state.channel.length;
    client.send("mute video");
    for (let i = 0; i < 50 && !stub.state.channel.slice(before).some((m) => m.type === "m.call.sdp_stream_metadata_changed"); i++) await sleep(100);
    const muted = stub.state.channel.slice(before).find((m) => m.type === "m.call.sdp_stream_metadata_changed");
    expect("mute video: sdp_stream_metadata_changed on the channel with video_muted", muted?.content?.sdp_stream_metadata?.[own[0]]?.video_muted === true &&
      muted.content.sdp_stream_metadata[own[0]].audio_muted === false, muted?.content);

    // The stub stops pinging: the client hangs up within its ping timeout
    // (--ping-timeout 1500) and calls again 5 s later (a new call).
    const firstCall = c.call_id;
    const stopped = Date.now();
    clearInterval(stub.state.call.pinger);
    const ended = await client.waitFor("ping timeout", (e) => e.event === "call_state" && e.state === "ended", 10000).catch((e) => ({ error: e.message }));
    const timedOutMs = Date.now() - stopped;
    expect("no pings for 1.5 s: the client hangs up (focus_ping_timeout) within 3 s", ended.reason === "focus_ping_timeout" && timedOutMs < 3000, { ...ended, ms: timedOutMs });
    for (let i = 0; i < 100 && stub.state.invites.length < 2; i++) await sleep(100);
    const again = stub.state.invites[1]?.content;
    expect("then it calls again: a new call_id, seq 0, Olm", again && again.call_id !== firstCall && again.seq === 0 && stub.state.invites[1].encrypted, again && { call_id: again.call_id, seq: again.seq });

    // Leave: a hangup reaches the stub, the member entry goes.
    client.send("leave");
    await client.waitFor("left", (e) => e.event === "left", 15000);
    for (let i = 0; i < 50 && stub.state.hangups.length < 2; i++) await sleep(100);
    const [h1, h2] = stub.state.hangups;
    expect("hangups reached the focus's session: focus_ping_timeout for the first call, user_hangup for the second",
      h1?.dest_session_id === stub.session && h1.reason === "focus_ping_timeout" && h1.call_id === firstCall &&
      h2?.reason === "user_hangup" && h2.call_id === again?.call_id && h2.dest_session_id === bot.device_id, stub.state.hangups);
    const after = await api(hs.url, "GET", `/_matrix/client/v3/rooms/${encodeURIComponent(room)}/state/org.matrix.msc3401.call.member/${encodeURIComponent(ready.user_id)}`, { token: alice.access_token });
    expect("member entry removed on leave", JSON.stringify(after) === JSON.stringify({ "m.calls": [] }), after);
    const seqs = {};
    for (const m of stub.state.received.filter((m) => m.sender === ready.user_id)) (seqs[m.content.call_id] ??= []).push(m.content.seq);
    expect("client's to-device seq contiguous from 0 per call, all Olm", Object.values(seqs).every((l) => l.every((s, i) => s === i)) &&
      stub.state.received.every((m) => m.encrypted), seqs);

    // What the client sent, for checking against groupcall's own parsers.
    writeFileSync(join(logDir, "client-to-device.json"), JSON.stringify(stub.state.received.filter((m) => m.sender === ready.user_id).map((m) => ({ type: m.type, content: m.content })), null, 1));
    writeFileSync(join(logDir, "client-channel.json"), JSON.stringify(stub.state.channel, null, 1));
    client.send("quit");
    const exit = await client.exited;
    expect("client exited 0", exit.code === 0, exit);
  } finally {
    if (client && client.proc.exitCode === null) client.proc.kill("SIGTERM");
    stub?.stop();
    await hs.stop();
  }
}

main().then(
  () => {
    out({ check: "focus", ok: failures.length === 0, failed: failures, logs: keepLogs ? logDir : null });
    if (!keepLogs) rmSync(logDir, { recursive: true, force: true });
    process.exit(failures.length === 0 ? 0 : 1);
  },
  (e) => {
    out({ check: "focus", ok: false, error: e?.message ?? String(e), logs: logDir });
    process.exit(1);
  },
);
