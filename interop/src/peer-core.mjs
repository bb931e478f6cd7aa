// The reference peer: matrix-js-sdk's legacy GroupCall (MSC3401 full mesh),
// shared by the Node peer and the browser page. Everything that differs
// between the two (frame counting, media cleanup) comes in through
// `platform`; everything observable goes out through `emit(object)` as one
// JSON line each.
//
// platform = {
//   countFrames(track, feed) -> { read(): number | Promise<number>, stop() }
//   cleanup(): void            stop synthetic media, sinks, ...
// }

import { UserId } from "@matrix-org/matrix-sdk-crypto-wasm";
import { parseCandidateIps, reportRemoteCandidates, restrictCandidates } from "./candidates.mjs";

const CALL_STATE_TYPE = "org.matrix.msc3401.call";
const CALL_MEMBER_TYPE = "org.matrix.msc3401.call.member";
// Bound for flushing hangups and the member-state update when leaving.
const LEAVE_FLUSH_MS = 5000;

export function errorMessage(e) {
  if (!e) return String(e);
  const parts = [e.message ?? String(e)];
  if (e.errcode) parts.push(`(${e.errcode})`);
  return parts.join(" ");
}

/**
 * Start the peer. Resolves with a controller once the peer is in the call:
 * { command(line): Promise<void>, shutdown(code, reason): Promise<number> }.
 * `command` runs one stdin command other than quit; `shutdown` leaves the
 * call cleanly and resolves with the exit code.
 */
export async function startPeer({ sdk, opts, platform, emit }) {
  const { ClientEvent, GroupCallEvent, CallEvent, CallFeedEvent, GroupCallIntent, GroupCallType } = sdk;
  const roomId = opts.room;
  const { track, flush } = requestTracker(LEAVE_FLUSH_MS); // requests to finish before we exit

  // ---- log in ------------------------------------------------------------
  const client = await loggedInClient(sdk, opts, {
    // v43 throws "Unimplemented" when it tries to encrypt m.call.* itself;
    // with --encrypted we encrypt in the sendToDevice wrapper below instead.
    useE2eForGroupCall: false,
  });
  if (!client.groupCallEventHandler) {
    throw new Error("matrix-js-sdk reports no WebRTC support (window/document/RTCPeerConnection shims missing?)");
  }
  // --no-crypto: as a matrix-js-sdk client without crypto, no OlmMachine, so
  // no device keys are published; call signalling goes out as plaintext
  // to-device messages (useE2eForGroupCall is false) and plaintext comes in.
  if (!opts.noCrypto) await client.initRustCrypto({ useIndexedDB: false });
  if (opts.iceServer) {
    // Instead of the homeserver's /voip/turnServer answer (none on a test
    // Synapse): a fixed STUN/TURN URI for every peer connection.
    client.turnServers = [{ urls: [opts.iceServer] }];
    client.turnServersExpiry = Date.now() + 365 * 24 * 3600 * 1000;
  }

  // ---- to-device: logging, optional Olm encryption, flush tracking --------
  const encryptor = opts.encrypted ? new CallEncryptor(client) : null;
  const candidateIps = parseCandidateIps(opts.candidateIps ?? []);
  if (opts.logSignalling) reportRemoteCandidates(globalThis.RTCPeerConnection, emit);
  const rawSendToDevice = client.sendToDevice.bind(client);
  client.sendToDevice = (eventType, contentMap, txnId) => {
    if (!eventType.startsWith("m.call.")) return rawSendToDevice(eventType, contentMap, txnId);
    if (candidateIps.size > 0) {
      // --candidate-ip: offer only UDP candidates on these addresses.
      contentMap = new Map([...contentMap].map(([user, devices]) =>
        [user, new Map([...devices].map(([device, c]) => [device, restrictCandidates(eventType, c, candidateIps)]))]));
    }
    for (const [userId, devices] of opts.logSignalling ? contentMap : []) {
      for (const [deviceId, content] of devices) {
        emit({
          event: "signalling", direction: "out", type: eventType,
          to_user: userId, to_device: deviceId, encrypted: !!encryptor, content,
        });
      }
    }
    const send = encryptor
      ? encryptor.send(eventType, contentMap, (type, map) => rawSendToDevice(type, map))
      : rawSendToDevice(eventType, contentMap, txnId);
    return track(send);
  };
  const rawSendStateEvent = client.sendStateEvent.bind(client);
  client.sendStateEvent = (...args) => track(rawSendStateEvent(...args));

  client.on(ClientEvent.ReceivedToDeviceMessage, ({ message, encryptionInfo }) => {
    if (!opts.logSignalling) return;
    if (opts.noCrypto && message.type === "m.room.encrypted") {
      // Without crypto, anything encrypted to us stays undecrypted.
      emit({ event: "signalling", direction: "in", type: message.type, sender: message.sender, encrypted: true, decrypted: false });
      return;
    }
    if (!message.type?.startsWith("m.call.")) return;
    emit({
      event: "signalling", direction: "in", type: message.type, sender: message.sender,
      encrypted: encryptionInfo !== null,
      sender_device: encryptionInfo?.senderDevice ?? message.content?.device_id ?? null,
      content: message.content,
    });
  });
  client.on(sdk.RoomStateEvent.Events, (event) => {
    const type = event.getType();
    if (!opts.logSignalling || event.getRoomId() !== roomId) return;
    if (type !== CALL_STATE_TYPE && type !== CALL_MEMBER_TYPE) return;
    emit({ event: "state", type, state_key: event.getStateKey(), sender: event.getSender(), content: event.getContent() });
  });

  // ---- join the room and sync -------------------------------------------
  await client.joinRoom(roomId);
  await startAndSync(client, sdk);
  emit({
    event: "ready", user_id: client.getUserId(), device_id: client.getDeviceId(), session_id: client.getSessionId(),
    crypto: client.getCrypto() !== undefined,
  });

  await client.waitUntilRoomReadyForGroupCalls(roomId);
  let groupCall = client.getGroupCallForRoom(roomId);
  let created = false;
  if (!groupCall && opts.createCall) {
    const type = opts.callType === "voice" ? GroupCallType.Voice : GroupCallType.Video;
    const intent = { ring: GroupCallIntent.Ring, prompt: GroupCallIntent.Prompt, room: GroupCallIntent.Room }[opts.intent];
    groupCall = await client.createGroupCall(roomId, type, false, intent);
    created = true;
  } else if (!groupCall) {
    groupCall = await new Promise((resolve) => {
      const onCall = (gc) => {
        if (gc.room.roomId !== roomId) return;
        client.off("GroupCall.incoming", onCall);
        resolve(gc);
      };
      client.on("GroupCall.incoming", onCall);
    });
  }

  // ---- observe the call -------------------------------------------------
  const feeds = new Map(); // CallFeed -> { counters, onMute }
  const seenCalls = new WeakSet();
  const who = (feed) => ({ user_id: feed.userId, device_id: feed.deviceId ?? null });
  const feedInfo = (feed) => ({
    ...who(feed), stream_id: feed.stream.id, purpose: feed.purpose,
    audio_muted: feed.isAudioMuted(), video_muted: feed.isVideoMuted(),
  });

  // Start counting on every track of the feed not counted yet.
  const countTracks = (feed, entry) => {
    for (const t of feed.stream.getTracks()) {
      if (entry.counters.has(t.id)) continue;
      // The moment the first frame is decoded (audio: with sound), where the
      // platform can tell; `media` lines come only every --media-interval.
      const first = () => emit({ event: "first_frame", ...who(feed), stream_id: feed.stream.id, purpose: feed.purpose, kind: t.kind, track_id: t.id });
      entry.counters.set(t.id, { kind: t.kind, ...platform.countFrames(t, feed, first) });
    }
  };
  const syncFeeds = () => {
    const current = [...groupCall.userMediaFeeds, ...groupCall.screenshareFeeds].filter((f) => !f.isLocal());
    for (const [feed, entry] of feeds) {
      if (current.includes(feed)) continue;
      feed.off(CallFeedEvent.MuteStateChanged, entry.onMute);
      for (const c of entry.counters.values()) c.stop();
      feeds.delete(feed);
      emit({ event: "feed_removed", ...who(feed), stream_id: feed.stream.id, purpose: feed.purpose });
    }
    for (const feed of current) {
      if (feeds.has(feed)) continue;
      const entry = { counters: new Map(), last: new Map(), onMute: () => emit({ event: "feed_muted", ...feedInfo(feed) }) };
      feed.on(CallFeedEvent.MuteStateChanged, entry.onMute);
      feeds.set(feed, entry);
      countTracks(feed, entry);
      emit({ event: "feed_added", ...feedInfo(feed) });
    }
  };
  groupCall.on(GroupCallEvent.UserMediaFeedsChanged, syncFeeds);
  groupCall.on(GroupCallEvent.ScreenshareFeedsChanged, syncFeeds);

  groupCall.on(GroupCallEvent.ParticipantsChanged, (participants) => {
    const list = [];
    for (const [member, devices] of participants) {
      for (const [deviceId, p] of devices) {
        list.push({ user_id: member.userId, device_id: deviceId, session_id: p.sessionId, screensharing: p.screensharing });
      }
    }
    emit({ event: "participants", participants: list });
  });

  groupCall.on(GroupCallEvent.CallsChanged, (calls) => {
    for (const devices of calls.values()) {
      for (const call of devices.values()) {
        if (seenCalls.has(call)) continue;
        seenCalls.add(call);
        let last = null;
        const report = (state) => {
          if (state === last) return; // the SDK re-emits unchanged states
          last = state;
          emit({
            event: "call_state",
            user_id: call.getOpponentMember()?.userId ?? call.invitee ?? null,
            device_id: call.getOpponentDeviceId() ?? null,
            call_id: call.callId,
            direction: call.direction,
            state,
            ...(state === "ended" ? { hangup_reason: call.hangupReason ?? null } : {}),
          });
        };
        call.on(CallEvent.State, report);
        report(call.state);
      }
    }
  });
  groupCall.on(GroupCallEvent.LocalMuteStateChanged, (audioMuted, videoMuted) =>
    emit({ event: "local_mute", audio_muted: audioMuted, video_muted: videoMuted }));
  groupCall.on(GroupCallEvent.LocalScreenshareStateChanged, (enabled) =>
    emit({ event: "local_screenshare", enabled }));
  groupCall.on(GroupCallEvent.Error, (e) =>
    emit({ event: "call_error", code: e.code ?? null, message: errorMessage(e) }));

  // Frame counts: once a second (--media-interval) per remote feed and track kind.
  const mediaInterval = opts.mediaInterval ?? 1000;
  const mediaTimer = setInterval(() => {
    reportMedia().catch((e) => emit({ event: "call_error", code: "media_stats", message: errorMessage(e) }));
  }, mediaInterval);
  const reportMedia = async () => {
    for (const [feed, entry] of feeds) {
      countTracks(feed, entry); // tracks can join a feed's stream later
      for (const [id, counter] of entry.counters) {
        const frames = await counter.read();
        const audible = counter.audible?.(); // audio: frames with sound (read() first)
        const previous = entry.last.get(id) ?? 0;
        entry.last.set(id, frames);
        emit({ event: "media", ...who(feed), stream_id: feed.stream.id, purpose: feed.purpose, kind: counter.kind, track_id: id, frames, ...(audible === undefined ? {} : { audible }), fps: Math.round(((frames - previous) * 1000) / mediaInterval) });
      }
    }
  };

  // ---- enter ------------------------------------------------------------
  // Muting before enter() only sets the initial state of the local feed.
  const muteVideo = opts.muteVideo || (opts.callType === "voice" && groupCall.type === GroupCallType.Video);
  if (opts.muteAudio) await groupCall.setMicrophoneMuted(true);
  if (muteVideo) await groupCall.setLocalVideoMuted(true);
  const enter = async () => {
    await groupCall.enter();
    emit({
      event: "joined", call_id: groupCall.groupCallId, room_id: roomId, created,
      type: groupCall.type, intent: groupCall.intent,
      user_id: client.getUserId(), device_id: client.getDeviceId(), session_id: client.getSessionId(),
    });
  };
  await enter();
  if (opts.screenshare) await groupCall.setScreensharingEnabled(true, { throwOnFail: true });

  // ---- control ------------------------------------------------------------
  // leave() hangs up every call and removes our device from the member state
  // (requests that are tracked by `track`); terminate() also ends the call
  // for everyone with "m.terminated" in the call's state event.
  const leave = async ({ terminate = false } = {}) => {
    if (groupCall.state !== "entered") return false;
    if (terminate) await groupCall.terminate();
    else groupCall.leave();
    await flush();
    syncFeeds();
    emit({ event: "left", call_id: groupCall.groupCallId, terminated: terminate });
    return true;
  };

  const commands = {
    "mute audio": () => groupCall.setMicrophoneMuted(true),
    "unmute audio": () => groupCall.setMicrophoneMuted(false),
    "mute video": () => groupCall.setLocalVideoMuted(true),
    "unmute video": () => groupCall.setLocalVideoMuted(false),
    // setScreensharingEnabled resolves with the new state
    "screenshare on": async () => (await groupCall.setScreensharingEnabled(true, { throwOnFail: true })) === true,
    "screenshare off": async () => (await groupCall.setScreensharingEnabled(false)) === false,
    "leave": () => leave(),
    "terminate": () => leave({ terminate: true }),
    "enter": enter,
  };

  const shutdown = shutdownOnce({
    emit,
    before: () => clearInterval(mediaTimer),
    leave,
    after: () => {
      client.stopClient();
      for (const entry of feeds.values()) for (const c of entry.counters.values()) c.stop();
      platform.cleanup();
    },
  });

  const command = (line) => runCommand(commands, line, emit);

  return { command, shutdown, client, groupCall };
}

/**
 * Keeps the requests that must finish before the peer exits: `track(p)`
 * adds a promise and returns it; `flush()` waits until none is left, at most
 * `limitMs`.
 */
export function requestTracker(limitMs) {
  const pending = new Set();
  const track = (promise) => {
    pending.add(promise);
    const done = () => pending.delete(promise);
    promise.then(done, done);
    return promise;
  };
  const flush = async () => {
    let timer;
    const timeout = new Promise((resolve) => { timer = setTimeout(resolve, limitMs); });
    while (pending.size > 0) {
      const done = await Promise.race([Promise.allSettled([...pending]).then(() => true), timeout.then(() => false)]);
      if (!done) break;
    }
    clearTimeout(timer);
  };
  return { track, flush };
}

/**
 * The peer's `shutdown(code, reason)`: runs once (later calls get the same
 * promise): `before()`, `await leave()` (a failure is reported and makes the
 * exit code 1 if it was 0), `after()`, then the `exit` line; resolves with
 * the exit code.
 */
export function shutdownOnce({ emit, before, leave, after }) {
  let shuttingDown = null;
  return (code, reason) => {
    shuttingDown ??= (async () => {
      before();
      try {
        await leave();
      } catch (e) {
        emit({ event: "error", message: `leaving failed: ${errorMessage(e)}` });
        code = code || 1;
      }
      after();
      emit({ event: "exit", code, reason });
      return code;
    })();
    return shuttingDown;
  };
}

/**
 * Runs one stdin command line from `commands` (name -> async function; a
 * result of `false` means "not done") and reports it as a `command` line.
 */
export async function runCommand(commands, line, emit) {
  const cmd = line.trim().replace(/\s+/g, " ").toLowerCase();
  if (cmd === "") return;
  const run = commands[cmd];
  if (!run) {
    emit({ event: "command", command: cmd, ok: false, message: "unknown command" });
    return;
  }
  try {
    const result = await run();
    emit({ event: "command", command: cmd, ok: result !== false });
  } catch (e) {
    emit({ event: "command", command: cmd, ok: false, message: errorMessage(e) });
  }
}

/**
 * A client of a new device of `opts.user` (logged in with `logIn`), created
 * with `extra` client options; not started.
 */
export async function loggedInClient(sdk, opts, extra = {}) {
  const creds = await logIn(sdk, opts);
  return sdk.createClient({
    baseUrl: opts.homeserver,
    userId: creds.user_id,
    deviceId: creds.device_id,
    accessToken: creds.access_token,
    ...extra,
  });
}

/** Password login (after registering with `opts.register`); the login response. */
async function logIn(sdk, opts) {
  const anon = sdk.createClient({ baseUrl: opts.homeserver });
  const localpart = opts.user.replace(/^@/, "").split(":")[0];
  if (opts.register) {
    const params = { username: localpart, password: opts.password, initial_device_display_name: "groupcall-interop" };
    try {
      return await anon.registerRequest({ ...params, auth: { type: "m.login.dummy" } });
    } catch (e) {
      if (e.httpStatus === 401 && e.data?.session) {
        try {
          return await anon.registerRequest({ ...params, auth: { type: "m.login.dummy", session: e.data.session } });
        } catch (e2) {
          if (e2.errcode !== "M_USER_IN_USE") throw e2;
        }
      } else if (e.errcode !== "M_USER_IN_USE") {
        throw e;
      }
    }
  }
  return anon.loginRequest({
    type: "m.login.password",
    identifier: { type: "m.id.user", user: opts.user },
    password: opts.password,
    initial_device_display_name: "groupcall-interop",
  });
}

/** Starts the client and resolves after the first sync. */
export function startAndSync(client, sdk) {
  return new Promise((resolve, reject) => {
    const onSync = (state, _prev, data) => {
      if (state === sdk.SyncState.Prepared || state === sdk.SyncState.Syncing) {
        client.off(sdk.ClientEvent.Sync, onSync);
        resolve();
      } else if (state === sdk.SyncState.Error) {
        client.off(sdk.ClientEvent.Sync, onSync);
        reject(new Error(`initial sync failed: ${errorMessage(data?.error)}`));
      }
    };
    client.on(sdk.ClientEvent.Sync, onSync);
    client.startClient({ initialSyncLimit: 1, lazyLoadMembers: false }).catch(reject);
  });
}

/**
 * Sends m.call.* to-device messages Olm-encrypted, the way MSC3401 asks for.
 * The SDK's own path (useE2eForGroupCall) throws in v43, so the peer wraps
 * sendToDevice with this. Recipients share no encrypted room with us, so the
 * OlmMachine does not track them on its own: track and query them first.
 */
export class CallEncryptor {
  constructor(client) {
    this.client = client;
    this.crypto = client.getCrypto();
    this.queue = Promise.resolve(); // keep sends in order, like the plaintext path
  }

  send(eventType, contentMap, sendRaw) {
    const job = this.queue.then(async () => {
      const encrypted = new Map();
      for (const [userId, devices] of contentMap) {
        const out = new Map();
        for (const [deviceId, content] of devices) {
          await this.ensureDevice(userId, deviceId);
          const { batch } = await this.crypto.encryptToDeviceMessages(eventType, [{ userId, deviceId }], content);
          if (batch.length !== 1) throw new Error(`could not encrypt ${eventType} for ${userId} ${deviceId}`);
          out.set(deviceId, batch[0].payload);
        }
        encrypted.set(userId, out);
      }
      return sendRaw("m.room.encrypted", encrypted);
    });
    this.queue = job.catch(() => {});
    return job;
  }

  async ensureDevice(userId, deviceId) {
    const known = async () => (await this.crypto.getUserDeviceInfo([userId])).get(userId)?.has(deviceId) ?? false;
    if (await known()) return;
    // Internals of RustCrypto: there is no public "track this user" call.
    // Tracking queues a /keys/query, which the outgoing-request loop sends.
    await this.crypto.olmMachine.updateTrackedUsers([new UserId(userId)]);
    await this.crypto.outgoingRequestsManager.doProcessOutgoingRequests();
    if (await known()) return;
    // Already tracked, but the device is newer than our copy of the list.
    await this.crypto.olmMachine.markAllTrackedUsersAsDirty();
    await this.crypto.outgoingRequestsManager.doProcessOutgoingRequests();
    if (!(await known())) throw new Error(`no device keys for ${userId} ${deviceId}`);
  }
}
