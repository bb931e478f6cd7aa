// Turn the `node` scenario's --log-signalling output into golden JSON files:
// the exact content of each m.call.* to-device message and of the MSC3401
// state events the reference writes, with ids, addresses and timestamps
// replaced by stable placeholders (consistently, so the SDP msid stream ids
// still match the sdp_stream_metadata keys).

import { mkdirSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { networkInterfaces } from "node:os";
import { join } from "node:path";

const FAR_FUTURE_TS = 4102444800000; // 2100-01-01, so expiry checks still pass

function makeAnonymizer({ alice, bob, A, B }) {
  const exact = new Map();
  const ready = (p) => p.events.find((e) => e.event === "ready");
  const [ra, rb] = [ready(alice), ready(bob)];
  exact.set(A, "@alice:localhost");
  exact.set(B, "@bob:localhost");
  exact.set(ra.device_id, "ALICEDEVICE");
  exact.set(rb.device_id, "BOBDEVICE");
  exact.set(ra.session_id, "AliceSess1");
  exact.set(rb.session_id, "BobSession");
  exact.set(alice.events.find((e) => e.event === "joined").call_id, "1700000000000GroupCallId00");
  let calls = 0;
  for (const e of [...alice.events, ...bob.events]) {
    const id = e.event === "signalling" ? e.content.call_id : null;
    if (id && !exact.has(id)) exact.set(id, `17000000000${String(++calls).padStart(2, "0")}PeerCallId0000`);
  }
  let ips = 0;
  for (const addrs of Object.values(networkInterfaces())) {
    for (const a of addrs) {
      if (a.internal) continue;
      exact.set(a.address, a.family === "IPv4" ? `192.0.2.${100 + ++ips}` : `2001:db8::${++ips}`);
    }
  }
  const uuids = new Map();
  return (value) => {
    let text = JSON.stringify(value);
    for (const [from, to] of exact) text = text.split(from).join(to);
    text = text.replace(/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/g, (u) => {
      if (!uuids.has(u)) uuids.set(u, `00000000-0000-4000-8000-${String(uuids.size + 1).padStart(12, "0")}`);
      return uuids.get(u);
    });
    text = text.replace(/"expires_ts":\d+/g, `"expires_ts":${FAR_FUTURE_TS}`);
    return JSON.parse(text);
  };
}

export function writeGolden(dir, ctx) {
  const { alice, bob } = ctx;
  const anon = makeAnonymizer(ctx);
  const name = (p) => (p === alice ? "alice" : "bob");
  const all = [...alice.events.map((e) => [alice, e]), ...bob.events.map((e) => [bob, e])].sort((x, y) => x[1]._t - y[1]._t);
  const received = all.filter(([, e]) => e.event === "signalling" && e.direction === "in");
  const states = alice.events.filter((e) => e.event === "state");

  const toDevice = (e) => ({ type: e.type, sender: e.sender, content: e.content });
  const pick = (what, pred) => {
    const found = received.find(([, e]) => pred(e));
    if (!found) throw new Error(`golden: no ${what} in the transcript`);
    return toDevice(found[1]);
  };
  const purposes = (e) => Object.values(e.content.sdp_stream_metadata ?? {}).map((m) => m.purpose);
  const state = (what, pred) => {
    const e = states.find(pred);
    if (!e) throw new Error(`golden: no ${what} state event`);
    return { type: e.type, state_key: e.state_key, sender: e.sender, content: e.content };
  };
  const memberCalls = (e) => e.type === "org.matrix.msc3401.call.member" && e.state_key === ctx.B ? e.content["m.calls"] : null;

  const files = {
    "m.call.invite.json": pick("invite", (e) => e.type === "m.call.invite"),
    "m.call.answer.json": pick("answer", (e) => e.type === "m.call.answer"),
    "m.call.candidates.json": pick("candidates", (e) => e.type === "m.call.candidates"),
    "m.call.select_answer.json": pick("select_answer", (e) => e.type === "m.call.select_answer"),
    "m.call.sdp_stream_metadata_changed.json": pick("mute", (e) => e.type === "m.call.sdp_stream_metadata_changed" &&
      Object.values(e.content.sdp_stream_metadata).some((m) => m.audio_muted)),
    "m.call.negotiate.offer.json": pick("screenshare offer", (e) => e.type === "m.call.negotiate" &&
      e.content.description.type === "offer" && purposes(e).includes("m.screenshare")),
    "m.call.negotiate.answer.json": pick("negotiate answer", (e) => e.type === "m.call.negotiate" &&
      e.content.description.type === "answer" && purposes(e).length > 0),
    "m.call.hangup.json": pick("hangup", (e) => e.type === "m.call.hangup"),
    "org.matrix.msc3401.call.json": state("call", (e) => e.type === "org.matrix.msc3401.call" && !e.content["m.terminated"]),
    "org.matrix.msc3401.call.terminated.json": state("terminated call", (e) => e.type === "org.matrix.msc3401.call" && e.content["m.terminated"]),
    "org.matrix.msc3401.call.member.json": state("member", (e) => memberCalls(e)?.[0]?.["m.devices"]?.[0]?.feeds.length === 1),
    "org.matrix.msc3401.call.member.screenshare.json": state("screensharing member", (e) => memberCalls(e)?.[0]?.["m.devices"]?.[0]?.feeds.length === 2),
    "org.matrix.msc3401.call.member.left.json": state("member who left", (e) => memberCalls(e)?.length === 0),
  };
  // Every m.call.* message in the order it was sent, with its group fields:
  // shows seq numbering, batching and who sends what.
  files["transcript.json"] = all
    .filter(([, e]) => e.event === "signalling" && e.direction === "out")
    .map(([p, e]) => ({
      from: name(p), type: e.type, call_id: e.content.call_id, seq: e.content.seq, party_id: e.content.party_id,
      dest_session_id: e.content.dest_session_id,
      ...(e.type === "m.call.candidates" ? { candidates: e.content.candidates.length } : {}),
      ...(e.type === "m.call.hangup" ? { reason: e.content.reason } : {}),
      ...(e.content.sdp_stream_metadata ? { sdp_stream_metadata: e.content.sdp_stream_metadata } : {}),
    }));

  mkdirSync(dir, { recursive: true });
  for (const f of readdirSync(dir)) if (f.endsWith(".json")) rmSync(join(dir, f));
  for (const [file, value] of Object.entries(files)) {
    writeFileSync(join(dir, file), JSON.stringify(anon(value), null, 2) + "\n");
  }
  return Object.keys(files);
}
