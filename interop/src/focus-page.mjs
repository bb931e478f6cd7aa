// The MSC3898 focus client inside headless Chromium: one participant of an
// MSC3401 call that publishes and subscribes through a focus (an SFU) only,
// with the browser's own RTCPeerConnection and RTCDataChannel. matrix-js-sdk
// is used for Matrix alone (login, sync, room state, Olm-encrypted to-device
// through its Rust crypto); its GroupCall is not (it has no focus mode).
//
// Bundled by src/build-browser.mjs and driven by src/chromium.mjs (see
// focus-client.mjs) through the bindings of src/page-glue.mjs, like the
// reference's browser page.
//
// The protocol, as groupcall's own client speaks it to its focus
// (crates/groupcall-proto/src/call/focus.rs, docs/protocol.md "The focus"):
// - our member entry lists the focus in `m.foci.active` (and the unstable
//   `org.matrix.msc3898.foci.active`) and `m.foci.preferred`;
// - we call the focus device with an Olm-encrypted `m.call.invite` whose
//   `dest_session_id` is the focus's device id (it has no member entry); its
//   answer names its session, used as `dest_session_id` from then on;
// - the offer carries our audio and video (sendrecv) and the data channel
//   (label DATA_CHANNEL_LABEL, ordered, reliable, opened by us);
// - on the channel (`{"type", "content"}` JSON text): the focus's
//   `m.call.sdp_stream_metadata_changed` lists every stream of the call with
//   its publisher; we subscribe to all tracks of the others
//   (`m.call.track_subscription`); the focus offers them with
//   `m.call.negotiate` and we answer on the channel; `m.call.ping` gets an
//   `m.call.pong` at once. We never offer on the channel, so there is no
//   glare on our side.

import * as sdk from "matrix-js-sdk";
import { CallEncryptor, errorMessage, loggedInClient, requestTracker, runCommand, shutdownOnce, startAndSync } from "./peer-core.mjs";
import { parseCandidateIps, restrictCandidates } from "./candidates.mjs";
import { memberContent, sdpSections } from "./focus-helpers.mjs";
import { emit, installPageGlue } from "./page-glue.mjs";

/** The label of the data channel we open (groupcall-media's DATA_CHANNEL_LABEL). */
export const DATA_CHANNEL_LABEL = "m.call";
const CALL_TYPE = "org.matrix.msc3401.call";
/** With --simulcast: the camera's three layers, lowest first (the RIDs
 * groupcall's own client sends: q, h, f). */
const SIMULCAST_ENCODINGS = [
  { rid: "q", scaleResolutionDownBy: 4 },
  { rid: "h", scaleResolutionDownBy: 2 },
  { rid: "f", scaleResolutionDownBy: 1 },
];
const MEMBER_TYPE = "org.matrix.msc3401.call.member";
const INVITE_LIFETIME_MS = 60000;
const MEMBER_EXPIRY_MS = 3600 * 1000;
const MEMBER_REFRESH_MS = 45 * 60 * 1000;
const GATHER_WAIT_MS = 2000;
const RETRY_DELAY_MS = 5000;
const LEAVE_FLUSH_MS = 5000;

const randomId = (n = 16) => {
  const abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  return Array.from(crypto.getRandomValues(new Uint8Array(n)), (b) => abc[b % abc.length]).join("");
};

const started = installPageGlue();
let up = false;

async function start(opts) {
  const roomId = opts.room;
  const focus = opts.focus; // { user_id, device_id }
  const candidateIps = parseCandidateIps(opts.candidateIps ?? []);
  const { track, flush } = requestTracker(LEAVE_FLUSH_MS); // requests to finish before exiting

  // ---- Matrix ---------------------------------------------------------------
  // No legacy call handlers: we speak to the focus ourselves.
  const client = await loggedInClient(sdk, opts, { disableVoip: true });
  await client.initRustCrypto({ useIndexedDB: false });
  const encryptor = opts.plaintext ? null : new CallEncryptor(client);
  const me = { user_id: client.getUserId(), device_id: client.getDeviceId(), session_id: client.getSessionId() };
  await client.joinRoom(roomId);
  await startAndSync(client, sdk);
  emit({ event: "ready", ...me, crypto: true, focus });

  // ---- the room's call ------------------------------------------------------
  const room = client.getRoom(roomId);
  const currentCall = () => {
    const events = room?.currentState.getStateEvents(CALL_TYPE) ?? [];
    const live = events.filter((e) => !e.getContent()["m.terminated"] && e.getStateKey());
    live.sort((a, b) => b.getTs() - a.getTs());
    return live[0]?.getStateKey() ?? null;
  };
  let confId = currentCall();
  let created = false;
  if (!confId && opts.createCall) {
    confId = `${Date.now()}${randomId(10)}`;
    await client.sendStateEvent(roomId, CALL_TYPE, { "m.intent": "m.prompt", "m.type": "m.video", "io.element.ptt": false, dataChannelsEnabled: true }, confId);
    created = true;
  }
  if (!confId) {
    confId = await new Promise((resolve) => {
      const onState = () => {
        const id = currentCall();
        if (!id) return;
        client.off(sdk.RoomStateEvent.Events, onState);
        resolve(id);
      };
      client.on(sdk.RoomStateEvent.Events, onState);
    });
  }

  // ---- local media: Chromium's fake devices -----------------------------------
  // --camera (default 640x360 at 15 fps), an exact size: its simulcast
  // layers are a quarter, half and all of it.
  const cam = opts.camera ?? { width: 640, height: 360, frameRate: 15 };
  const local = await navigator.mediaDevices.getUserMedia({
    audio: true,
    video: { width: { exact: cam.width }, height: { exact: cam.height }, frameRate: { ideal: cam.frameRate, max: cam.frameRate } },
  });
  const sinks = document.getElementById("sinks");
  const ownMetadata = () => ({
    [local.id]: {
      purpose: "m.usermedia",
      audio_muted: local.getAudioTracks().every((t) => !t.enabled),
      video_muted: local.getVideoTracks().every((t) => !t.enabled),
      tracks: Object.fromEntries(local.getTracks().map((t) => [t.id, t.kind === "video" ? { width: cam.width, height: cam.height } : {}])),
    },
  });

  // ---- our member entry ---------------------------------------------------------
  let inCall = false;
  const publishMember = async (join) => {
    const existing = room?.currentState.getStateEvents(MEMBER_TYPE, me.user_id)?.getContent();
    const foci = [{ user_id: focus.user_id, device_id: focus.device_id }];
    const device = join ? {
      device_id: me.device_id, session_id: me.session_id, expires_ts: Date.now() + MEMBER_EXPIRY_MS,
      feeds: [{ purpose: "m.usermedia" }],
      "m.foci.active": foci, "org.matrix.msc3898.foci.active": foci,
      "m.foci.preferred": foci, "org.matrix.msc3898.foci.preferred": foci,
    } : null;
    const content = memberContent(existing, confId, me.device_id, device, Date.now());
    await track(client.sendStateEvent(roomId, MEMBER_TYPE, content, me.user_id));
    if (opts.logSignalling) emit({ event: "state", type: MEMBER_TYPE, state_key: me.user_id, sender: me.user_id, content });
  };

  // ---- to-device signalling with the focus ----------------------------------------
  let sendQueue = Promise.resolve();
  const sendToFocus = (call, type, body) => {
    let content = {
      ...body, version: "1", call_id: call.callId, party_id: me.device_id, conf_id: confId, device_id: me.device_id,
      sender_session_id: me.session_id, dest_session_id: call.focusSession ?? focus.device_id, seq: call.seq++,
    };
    if (candidateIps.size > 0) content = restrictCandidates(type, content, candidateIps);
    if (opts.logSignalling) emit({ event: "signalling", direction: "out", type, to_user: focus.user_id, to_device: focus.device_id, encrypted: !!encryptor, content });
    const map = new Map([[focus.user_id, new Map([[focus.device_id, content]])]]);
    const job = sendQueue.then(() => encryptor
      ? encryptor.send(type, map, (t, m) => client.sendToDevice(t, m))
      : client.sendToDevice(type, map));
    sendQueue = job.catch((e) => emit({ event: "call_error", code: "send", message: `${type}: ${errorMessage(e)}` }));
    return track(job);
  };

  // ---- the call with the focus ----------------------------------------------------
  let call = null; // { callId, pc, dc, seq, focusSession, answered, ... }
  let attempts = 0;
  let retryTimer = null;
  const publishers = new Map(); // stream id -> { user_id, device_id, purpose, audio_muted, video_muted, tracks }
  let available = new Map(); // the focus's last metadata: stream id -> entry
  const subscribed = new Map(); // "stream\ntrack" -> { stream_id, track_id }
  const counters = new Map(); // mid -> { last, element }

  const sendChannel = (type, content) => {
    if (!call?.dc || call.dc.readyState !== "open") return false;
    const text = JSON.stringify({ type, content });
    if (opts.logSignalling && type !== "m.call.pong") emit({ event: "channel", direction: "out", type, content: type === "m.call.negotiate" ? { ...content, description: { type: content.description.type, sdp_length: content.description.sdp.length } } : content });
    call.dc.send(text);
    return true;
  };

  const ownerOf = (streamId) => publishers.get(streamId) ?? null;
  const isMine = (s) => s.user_id === me.user_id && s.device_id === me.device_id;
  // Streams the focus names no publisher for are not subscribed to (as in
  // groupcall's client).
  const isOthers = (s) => typeof s.user_id === "string" && typeof s.device_id === "string" && !isMine(s);

  const learn = (meta) => {
    for (const [id, s] of Object.entries(meta ?? {})) {
      if (s && typeof s === "object" && s.user_id && s.device_id) publishers.set(id, { ...publishers.get(id), ...s });
    }
  };

  const resubscribe = () => {
    const wanted = new Map();
    for (const [streamId, s] of available) {
      if (!isOthers(s)) continue;
      for (const [trackId, meta] of Object.entries(s.tracks ?? {})) {
        // The publisher's size, or --want's (the focus's metadata may name
        // no size nor kind; a size in an audio subscription is ignored).
        const size = opts.want ?? meta;
        wanted.set(`${streamId}\n${trackId}`, { stream_id: streamId, track_id: trackId, ...(size?.width ? { width: size.width } : {}), ...(size?.height ? { height: size.height } : {}) });
      }
    }
    const subscribe = [...wanted].filter(([k]) => !subscribed.has(k)).map(([, v]) => v);
    const unsubscribe = [...subscribed].filter(([k]) => !wanted.has(k)).map(([, v]) => ({ stream_id: v.stream_id, track_id: v.track_id }));
    if (subscribe.length === 0 && unsubscribe.length === 0) return;
    if (!sendChannel("m.call.track_subscription", { subscribe, unsubscribe })) return;
    subscribed.clear();
    for (const [k, v] of wanted) subscribed.set(k, v);
    emit({ event: "subscription", subscribe, unsubscribe });
  };

  let negotiation = Promise.resolve();
  const onChannelMessage = (text) => {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      emit({ event: "call_error", code: "channel", message: "data-channel message is not JSON; ignored" });
      return;
    }
    const type = msg?.type;
    const content = msg?.content && typeof msg.content === "object" ? msg.content : {};
    if (opts.logSignalling && type !== "m.call.ping") {
      const shown = type === "m.call.negotiate" && content.description ? { ...content, description: { type: content.description.type, sdp_length: String(content.description.sdp ?? "").length } } : content;
      emit({ event: "channel", direction: "in", type, content: shown });
    }
    switch (type) {
      case "m.call.ping":
        call.lastPing = Date.now();
        call.pings++;
        sendChannel("m.call.pong", {});
        break;
      case "m.call.pong":
        break;
      case "m.call.sdp_stream_metadata_changed": {
        const meta = content.sdp_stream_metadata ?? content["org.matrix.msc3077.sdp_stream_metadata"] ?? {};
        learn(meta);
        available = new Map(Object.entries(meta).filter(([, s]) => s && typeof s === "object"));
        emit({
          event: "focus_metadata",
          streams: [...available].map(([id, s]) => ({
            stream_id: id, user_id: s.user_id ?? null, device_id: s.device_id ?? null, purpose: s.purpose ?? null,
            audio_muted: !!s.audio_muted, video_muted: !!s.video_muted, tracks: Object.keys(s.tracks ?? {}), mine: isMine(s),
          })),
        });
        resubscribe();
        break;
      }
      case "m.call.negotiate": {
        const d = content.description;
        learn(content.sdp_stream_metadata ?? content["org.matrix.msc3077.sdp_stream_metadata"]);
        if (!d || (d.type !== "offer" && d.type !== "answer") || typeof d.sdp !== "string") {
          emit({ event: "call_error", code: "channel", message: "m.call.negotiate without a usable description; ignored" });
          break;
        }
        const c = call;
        negotiation = negotiation.then(async () => {
          if (c !== call) return;
          if (d.type === "answer") {
            if (c.pc.signalingState === "have-local-offer") await c.pc.setRemoteDescription(d);
            return;
          }
          await c.pc.setRemoteDescription(d);
          await c.pc.setLocalDescription(await c.pc.createAnswer());
          let answer = { description: { type: "answer", sdp: c.pc.localDescription.sdp }, sdp_stream_metadata: ownMetadata() };
          if (candidateIps.size > 0) answer = restrictCandidates("m.call.negotiate", answer, candidateIps);
          sendChannel("m.call.negotiate", answer);
          const receiving = [...sdpSections(d.sdp).values()].filter((s) => s.stream_id && (s.direction === "sendonly" || s.direction === "sendrecv"));
          emit({ event: "negotiated", from: "focus", tracks: receiving.map((s) => ({ kind: s.kind, stream_id: s.stream_id, track_id: s.track_id, ...(ownerOf(s.stream_id) ? { user_id: ownerOf(s.stream_id).user_id, device_id: ownerOf(s.stream_id).device_id } : {}) })) });
        }).catch((e) => emit({ event: "call_error", code: "negotiate", message: errorMessage(e) }));
        break;
      }
      case "m.call.active_speaker":
        // groupcall's own message (docs/protocol.md, "The active speaker"):
        // whom the focus names as speaking; empty content for nobody.
        emit({ event: "active_speaker", user_id: content.user_id ?? null, device_id: content.device_id ?? null, stream_id: content.stream_id ?? null });
        break;
      case "m.call.focus_draining":
        // groupcall's own message (docs/protocol.md, "Drain"): the focus
        // stops after its grace period. This client uses the focus only:
        // it stays until the hangup, then retries as usual.
        emit({ event: "focus_draining", hangup_in_ms: Number.isInteger(content.hangup_in_ms) ? content.hangup_in_ms : null });
        break;
      default:
        if (opts.logSignalling) emit({ event: "channel_ignored", type: type ?? null });
    }
  };

  const endCall = (reason, { hangup = true, retry = true } = {}) => {
    const c = call;
    if (!c) return;
    call = null;
    clearInterval(c.watch);
    clearTimeout(c.answerTimer);
    if (hangup) sendToFocus(c, "m.call.hangup", { reason });
    try { c.dc?.close(); } catch { /* closed */ }
    c.pc.close();
    available = new Map();
    subscribed.clear();
    for (const entry of counters.values()) entry.element?.remove();
    counters.clear();
    emit({ event: "call_state", call_id: c.callId, state: "ended", reason });
    if (retry && inCall && attempts <= opts.retries) {
      retryTimer = setTimeout(() => { retryTimer = null; callFocus().catch((e) => emit({ event: "call_error", code: "invite", message: errorMessage(e) })); }, RETRY_DELAY_MS);
    }
  };

  const callFocus = async () => {
    if (!inCall || call) return;
    attempts++;
    const iceServers = opts.iceServer ? [{ urls: [opts.iceServer] }] : [];
    const pc = new RTCPeerConnection({ iceServers });
    const c = { callId: `${Date.now()}${randomId(12)}`, pc, dc: null, seq: 0, focusSession: null, answered: false, lastPing: 0, pings: 0, early: [], invited: false, trickle: [] };
    call = c;
    c.dc = pc.createDataChannel(DATA_CHANNEL_LABEL, { ordered: true });
    c.dc.onopen = () => {
      c.lastPing = Date.now();
      emit({ event: "channel_open", label: c.dc.label, call_id: c.callId });
      c.watch = setInterval(() => {
        if (call === c && Date.now() - c.lastPing > opts.pingTimeout) endCall("focus_ping_timeout");
      }, 250);
      resubscribe();
    };
    c.dc.onclose = () => { if (call === c) { emit({ event: "channel_closed", call_id: c.callId }); endCall("focus_channel_closed"); } };
    c.dc.onmessage = (ev) => { if (call === c) onChannelMessage(typeof ev.data === "string" ? ev.data : new TextDecoder().decode(ev.data)); };
    for (const t of local.getTracks()) {
      // --scalability: VP8 temporal layers on every encoding.
      const scalability = opts.scalability ? { scalabilityMode: opts.scalability } : {};
      if (t.kind === "video" && opts.simulcast) {
        // Browser simulcast (issue 12), lowest first; the top layer is the
        // camera. Chromium sends three layers only from 960x540 on (from
        // the default 640x360: 160x90 and 320x180; --camera 1280x720@15
        // gives 320x180, 640x360, 1280x720, which 2 cores encode).
        pc.addTransceiver(t, { direction: "sendrecv", streams: [local], sendEncodings: SIMULCAST_ENCODINGS.map((e) => ({ ...e, ...scalability })) });
      } else if (t.kind === "video" && opts.scalability) {
        pc.addTransceiver(t, { direction: "sendrecv", streams: [local], sendEncodings: [scalability] });
      } else {
        pc.addTrack(t, local);
      }
    }
    pc.onconnectionstatechange = () => {
      if (call !== c) return;
      emit({ event: "call_state", call_id: c.callId, state: pc.connectionState });
      if (pc.connectionState === "failed") endCall("ice_failed");
    };
    pc.ontrack = (ev) => {
      // Play received media in muted elements so Chromium decodes it.
      const el = document.createElement(ev.track.kind === "video" ? "video" : "audio");
      el.autoplay = true;
      el.muted = true;
      el.srcObject = new MediaStream([ev.track]);
      sinks.append(el);
      el.play().catch(() => {});
      counters.set(ev.transceiver.mid, { last: 0, element: el });
    };
    pc.onicecandidate = (ev) => {
      // Candidates gathered after the invite went out are trickled.
      if (call !== c || !c.invited) return;
      const cand = ev.candidate ? { candidate: ev.candidate.candidate, sdpMid: ev.candidate.sdpMid, sdpMLineIndex: ev.candidate.sdpMLineIndex } : { candidate: "" };
      c.trickle.push(cand);
      if (c.trickle.length === 1) {
        setTimeout(() => {
          if (call !== c) return;
          const candidates = c.trickle.splice(0);
          sendToFocus(c, "m.call.candidates", { candidates });
        }, 200);
      }
    };
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      const t = setTimeout(resolve, GATHER_WAIT_MS);
      pc.addEventListener("icegatheringstatechange", () => { if (pc.iceGatheringState === "complete") { clearTimeout(t); resolve(); } });
    });
    if (call !== c) return;
    c.invited = true;
    emit({ event: "call_state", call_id: c.callId, state: "invite_sent", attempt: attempts });
    try {
      await sendToFocus(c, "m.call.invite", {
        lifetime: INVITE_LIFETIME_MS,
        invitee: focus.user_id,
        offer: { type: "offer", sdp: pc.localDescription.sdp },
        capabilities: { "m.call.transferee": false, "m.call.dtmf": false },
        sdp_stream_metadata: ownMetadata(),
      });
    } catch {
      // Reported as call_error "send"; try again later like a refusal.
      if (call === c) endCall("invite_failed", { hangup: false });
      return;
    }
    c.answerTimer = setTimeout(() => { if (call === c && !c.answered) endCall("invite_timeout"); }, INVITE_LIFETIME_MS);
  };

  client.on(sdk.ClientEvent.ReceivedToDeviceMessage, ({ message, encryptionInfo }) => {
    const type = message.type ?? "";
    if (!type.startsWith("m.call.")) return;
    const content = message.content ?? {};
    const encrypted = encryptionInfo != null;
    const senderDevice = encryptionInfo?.senderDevice ?? content.device_id ?? null;
    if (opts.logSignalling) emit({ event: "signalling", direction: "in", type, sender: message.sender, sender_device: senderDevice, encrypted, content });
    const c = call;
    if (!c || message.sender !== focus.user_id || senderDevice !== focus.device_id || content.call_id !== c.callId) return;
    if (content.dest_session_id !== undefined && content.dest_session_id !== me.session_id) return;
    if (!encrypted && !opts.plaintext) {
      emit({ event: "call_error", code: "plaintext", message: `plaintext ${type} from the focus ignored` });
      return;
    }
    switch (type) {
      case "m.call.answer": {
        if (c.answered) return;
        c.answered = true;
        c.focusSession = content.sender_session_id ?? null;
        emit({ event: "call_state", call_id: c.callId, state: "answered", focus_session_id: c.focusSession, encrypted });
        negotiation = negotiation.then(async () => {
          await c.pc.setRemoteDescription(content.answer);
          for (const cand of c.early.splice(0)) await c.pc.addIceCandidate(cand).catch(() => {});
          sendToFocus(c, "m.call.select_answer", { selected_party_id: content.party_id ?? focus.device_id });
        }).catch((e) => { emit({ event: "call_error", code: "answer", message: errorMessage(e) }); endCall("answer_failed"); });
        break;
      }
      case "m.call.candidates":
        for (const cand of Array.isArray(content.candidates) ? content.candidates : []) {
          if (!cand?.candidate) continue; // end of candidates
          if (!c.answered) c.early.push(cand);
          else negotiation = negotiation.then(() => c.pc.addIceCandidate(cand)).catch(() => {});
        }
        break;
      case "m.call.hangup":
      case "m.call.reject":
        emit({ event: "focus_hangup", type, call_id: c.callId, reason: content.reason ?? null });
        endCall(content.reason ?? type, { hangup: false });
        break;
      default:
        break;
    }
  });

  // ---- media counters ---------------------------------------------------------------
  const mediaTimer = setInterval(() => {
    reportMedia().catch((e) => emit({ event: "call_error", code: "media_stats", message: errorMessage(e) }));
  }, opts.mediaInterval);
  const reportMedia = async () => {
    const c = call;
    if (!c || c.pc.signalingState === "closed") return;
    const stats = await c.pc.getStats();
    const sections = sdpSections(c.pc.currentRemoteDescription?.sdp);
    const midOfTrack = new Map(c.pc.getTransceivers().map((t) => [t.receiver.track?.id, t.mid]));
    const sent = {};
    let bwe = null;
    for (const s of stats.values()) {
      if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") {
        // The sender's bandwidth estimate (TWCC or REMB from the focus).
        bwe = s.availableOutgoingBitrate ?? null;
        continue;
      }
      if (s.type === "outbound-rtp") {
        const o = (sent[s.kind] ??= { packets: 0, bytes: 0, frames_encoded: 0 });
        o.packets += s.packetsSent ?? 0;
        o.bytes += s.bytesSent ?? 0;
        o.frames_encoded += s.framesEncoded ?? 0;
        if (s.kind === "video") {
          o.scalability = s.scalabilityMode ?? null;
          if (!s.rid) Object.assign(o, { width: s.frameWidth ?? null, height: s.frameHeight ?? null, fps: s.framesPerSecond ?? null });
        }
        if (s.rid) {
          // Simulcast: each layer's own counters and size.
          (o.layers ??= {})[s.rid] = {
            packets: s.packetsSent ?? 0, bytes: s.bytesSent ?? 0, frames_encoded: s.framesEncoded ?? 0,
            width: s.frameWidth ?? null, height: s.frameHeight ?? null, fps: s.framesPerSecond ?? null, active: s.active ?? null,
            limitation: s.qualityLimitationReason ?? null, scalability: s.scalabilityMode ?? null,
            target_bps: s.targetBitrate ?? null,
          };
        }
        continue;
      }
      if (s.type !== "inbound-rtp") continue;
      const mid = s.mid ?? midOfTrack.get(s.trackIdentifier);
      const sec = sections.get(mid);
      // Only what the focus sends now (not a track it stopped forwarding).
      if (!sec?.stream_id || !(sec.direction === "sendonly" || sec.direction === "sendrecv")) continue;
      const owner = ownerOf(sec.stream_id);
      const frames = s.kind === "video" ? s.framesDecoded ?? 0 : Math.floor((s.totalSamplesReceived ?? 0) / 480);
      const entry = counters.get(mid) ?? { last: 0 };
      counters.set(mid, entry);
      const fps = Math.round(((frames - entry.last) * 1000) / opts.mediaInterval);
      entry.last = frames;
      emit({
        event: "media", user_id: owner?.user_id ?? null, device_id: owner?.device_id ?? null, stream_id: sec.stream_id,
        purpose: owner?.purpose ?? null, kind: s.kind, track_id: sec.track_id, mid, frames, fps, packets: s.packetsReceived ?? 0,
        ...(s.kind === "audio" ? { audible: Math.floor(((s.totalSamplesReceived ?? 0) - (s.concealedSamples ?? 0)) / 480) } : {}),
        ...(s.kind === "video" ? {
          width: s.frameWidth ?? null, height: s.frameHeight ?? null, frames_received: s.framesReceived ?? null,
          frames_dropped: s.framesDropped ?? null, freezes: s.freezeCount ?? null, plis: s.pliCount ?? null,
          nacks: s.nackCount ?? null, packets_lost: s.packetsLost ?? null,
        } : {}),
      });
    }
    emit({ event: "sent", call_id: c.callId, audio: sent.audio ?? null, video: sent.video ?? null, pings: c.pings, bwe_bps: bwe });
  };

  // ---- enter / leave ------------------------------------------------------------------
  let refreshTimer = null;
  const enter = async () => {
    if (inCall) return false;
    await publishMember(true);
    inCall = true;
    attempts = 0;
    refreshTimer = setInterval(() => publishMember(true).catch((e) => emit({ event: "call_error", code: "member", message: errorMessage(e) })), MEMBER_REFRESH_MS);
    emit({ event: "joined", call_id: confId, room_id: roomId, created, ...me, focus });
    await callFocus();
    return true;
  };
  const leave = async () => {
    if (!inCall) return false;
    inCall = false;
    clearTimeout(retryTimer);
    clearInterval(refreshTimer);
    endCall("user_hangup", { retry: false });
    await publishMember(false);
    await flush();
    emit({ event: "left", call_id: confId });
    return true;
  };

  const setEnabled = (kind, enabled) => {
    for (const t of local.getTracks()) if (t.kind === kind) t.enabled = enabled;
    sendChannel("m.call.sdp_stream_metadata_changed", { sdp_stream_metadata: ownMetadata() });
    emit({ event: "local_mute", audio_muted: ownMetadata()[local.id].audio_muted, video_muted: ownMetadata()[local.id].video_muted });
  };
  const commands = {
    "leave": leave,
    "enter": enter,
    "mute audio": () => setEnabled("audio", false),
    "unmute audio": () => setEnabled("audio", true),
    "mute video": () => setEnabled("video", false),
    "unmute video": () => setEnabled("video", true),
  };
  const command = (line) => runCommand(commands, line, emit);
  const shutdown = shutdownOnce({
    emit,
    before: () => clearInterval(mediaTimer),
    leave,
    after: () => {
      client.stopClient();
      for (const t of local.getTracks()) t.stop();
    },
  });

  started({ command, shutdown });
  up = true;
  await enter();
}

start(window.__peerOpts).catch((e) => {
  emit({ event: "error", message: errorMessage(e) });
  if (up) window.__peerShutdown(1, "startup failed");
  else window.__peerExit(1);
});
