// What matrix-js-sdk's WebRTC code expects of a browser, provided in Node by
// @roamhq/wrtc plus a few stubs, and synthetic media in place of devices.

import wrtc from "@roamhq/wrtc";

const { MediaStream, nonstandard } = wrtc;

const SAMPLE_RATE = 48000;
const AUDIO_FRAME_MS = 10; // RTCAudioSource takes exactly 10 ms per onData
const TONE_HZ = 440;
const VIDEO_FPS = 15;

/** matrix-js-sdk 43 declares Node >= 22; Node 20 lacks Promise.withResolvers. */
export function polyfillWithResolvers() {
  if (Promise.withResolvers) return;
  Promise.withResolvers = function withResolvers() {
    let resolve, reject;
    const promise = new this((res, rej) => { resolve = res; reject = rej; });
    return { promise, resolve, reject };
  };
}

/** Make the globals the SDK reads exist. Must run before the SDK is imported. */
export function installShims() {
  polyfillWithResolvers();

  // supportsMatrixCall() wants `window` and `document`; call.js uses
  // window.RTCPeerConnection and the bare RTCRtpReceiver/RTCRtpSender globals
  // (getCapabilities, to strip RTX from screenshare transceivers).
  globalThis.window ??= globalThis;
  globalThis.document ??= { addEventListener() {}, removeEventListener() {}, visibilityState: "visible" };
  for (const name of [
    "RTCSessionDescription", "RTCIceCandidate", "RTCRtpReceiver", "RTCRtpSender",
    "RTCRtpTransceiver", "RTCDataChannel", "MediaStream", "MediaStreamTrack",
  ]) {
    globalThis[name] ??= wrtc[name];
  }
  globalThis.RTCPeerConnection ??= RemovingPeerConnection;

  // CallFeed measures speaking volume through a shared AudioContext with an
  // AnalyserNode. Node has none; a silent analyser is enough (nobody "speaks").
  globalThis.AudioContext ??= class AudioContext {
    createAnalyser() {
      return {
        fftSize: 512,
        smoothingTimeConstant: 0,
        get frequencyBinCount() { return this.fftSize / 2; },
        getFloatFrequencyData(array) { array.fill(-Infinity); },
        connect() {}, disconnect() {},
      };
    }
    createMediaStreamSource() { return { connect() {}, disconnect() {} }; }
    close() { return Promise.resolve(); }
  };
}

/**
 * wrtc does not "process the removal of a remote track": when the remote
 * side stops sending on an m-line (e.g. ends its screenshare), browsers take
 * the track out of its streams and fire `removetrack`, which is how
 * matrix-js-sdk drops the remote feed. Do that after setRemoteDescription.
 */
class RemovingPeerConnection extends wrtc.RTCPeerConnection {
  constructor(...args) {
    super(...args);
    this.streamsOfTrack = new Map();
    // keyed by id: wrtc may hand out different wrappers for the same track
    this.addEventListener("track", (ev) => this.streamsOfTrack.set(ev.track.id, ev.streams));
  }

  async setRemoteDescription(description) {
    await super.setRemoteDescription(description);
    const notSending = new Set();
    for (const section of (description?.sdp ?? "").split(/\r?\nm=/).slice(1)) {
      const mid = /\na=mid:(\S+)/.exec(section)?.[1];
      const rejected = /^\S+ 0 /.test(section);
      if (mid && (rejected || /\na=(recvonly|inactive)\b/.test(section))) notSending.add(mid);
    }
    for (const transceiver of this.getTransceivers()) {
      if (!notSending.has(transceiver.mid)) continue;
      const track = transceiver.receiver.track;
      const streams = this.streamsOfTrack.get(track.id) ?? [];
      this.streamsOfTrack.delete(track.id);
      for (const stream of streams) {
        // libwebrtc may already have taken it out, silently
        const member = stream.getTrackById(track.id);
        if (member) stream.removeTrack(member);
        const ev = new Event("removetrack");
        ev.track = track;
        stream.dispatchEvent(ev);
      }
    }
  }
}

/**
 * Synthetic capture devices: a 440 Hz tone (10 ms frames) and a moving I420
 * pattern (~15 fps) for user media, another pattern for the screen.
 * Exposed as navigator.mediaDevices, which the SDK's MediaHandler uses.
 */
export class SyntheticMedia {
  constructor() {
    this.audio = new nonstandard.RTCAudioSource();
    this.camera = new nonstandard.RTCVideoSource();
    this.screen = new nonstandard.RTCVideoSource({ isScreencast: true });
    this.tracks = new Set();
    this.timers = [];
    this.startAudio();
    this.startVideo(this.camera, 320, 240, 0);
    // The 640x360 screen pattern costs CPU: generated only once a screen is
    // shared (getDisplayMedia), not for every peer that never shares.
    this.screenStarted = false;
  }

  startAudio() {
    const samplesPerFrame = (SAMPLE_RATE * AUDIO_FRAME_MS) / 1000;
    let phase = 0;
    let sent = 0;
    const start = performance.now();
    // Timers drift; send however many frames are due so the rate stays 100/s
    // (after a stall, skip ahead rather than burst).
    this.timers.push(setInterval(() => {
      const expected = Math.floor((performance.now() - start) / AUDIO_FRAME_MS);
      if (expected - sent > 20) sent = expected - 20;
      for (; sent < expected; sent++) {
        const samples = new Int16Array(samplesPerFrame);
        for (let n = 0; n < samplesPerFrame; n++) {
          samples[n] = Math.round(Math.sin(phase) * 0.3 * 32767);
          phase += (2 * Math.PI * TONE_HZ) / SAMPLE_RATE;
        }
        phase %= 2 * Math.PI;
        this.audio.onData({ samples, sampleRate: SAMPLE_RATE, bitsPerSample: 16, channelCount: 1, numberOfFrames: samplesPerFrame });
      }
    }, AUDIO_FRAME_MS));
  }

  startVideo(source, width, height, style) {
    const data = new Uint8ClampedArray(width * height * 1.5);
    let tick = 0;
    this.timers.push(setInterval(() => {
      tick++;
      const ySize = width * height;
      // Luma: a diagonal gradient that scrolls, plus a bar sweeping across.
      const bar = (tick * 8) % width;
      for (let y = 0; y < height; y++) {
        const row = y * width;
        for (let x = 0; x < width; x++) {
          data[row + x] = Math.abs(x - bar) < 12 ? 235 : ((x + y + tick * 4) & 0xff) >> 1;
        }
      }
      // Chroma: flat colour, different for camera and screen.
      data.fill(style ? 90 : 160, ySize, ySize + ySize / 4);
      data.fill(style ? 200 : 100, ySize + ySize / 4);
      source.onFrame({ width, height, data });
    }, 1000 / VIDEO_FPS));
  }

  makeStream({ audio, video, screen }) {
    const tracks = [];
    if (audio) tracks.push(this.audio.createTrack());
    if (video) tracks.push(this.camera.createTrack());
    if (screen) {
      if (!this.screenStarted) {
        this.screenStarted = true;
        this.startVideo(this.screen, 640, 360, 1);
      }
      tracks.push(this.screen.createTrack());
    }
    for (const t of tracks) this.tracks.add(t);
    return new MediaStream(tracks);
  }

  mediaDevices() {
    const devices = [
      { kind: "audioinput", deviceId: "FakeAudioDevice", groupId: "synthetic", label: "Synthetic 440 Hz tone" },
      { kind: "videoinput", deviceId: "FakeVideoDevice", groupId: "synthetic", label: "Synthetic moving pattern" },
    ];
    return {
      enumerateDevices: async () => devices.map((d) => ({ ...d, toJSON() { return d; } })),
      getUserMedia: async (constraints = {}) => this.makeStream({ audio: !!constraints.audio, video: !!constraints.video }),
      getDisplayMedia: async () => this.makeStream({ screen: true }),
      addEventListener() {}, removeEventListener() {},
    };
  }

  stop() {
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    for (const t of this.tracks) t.stop();
    this.tracks.clear();
  }
}

/** Install navigator.mediaDevices backed by `media`. */
export function installMediaDevices(media) {
  const mediaDevices = media.mediaDevices();
  if (globalThis.navigator) {
    Object.defineProperty(globalThis.navigator, "mediaDevices", { value: mediaDevices, configurable: true });
  } else {
    globalThis.navigator = { mediaDevices, userAgent: "node" };
  }
}

/**
 * Count decoded frames of a received track with the nonstandard sinks. An
 * audio sink delivers 10 ms frames whether or not packets arrive (silence
 * before the connection is up): `audible` counts the frames with sound.
 * `onFirst()` is called at the first decoded video frame / audible audio
 * frame.
 */
export function countFrames(track, _feed, onFirst = () => {}) {
  let frames = 0;
  let audible = 0;
  const sink = track.kind === "audio" ? new nonstandard.RTCAudioSink(track) : new nonstandard.RTCVideoSink(track);
  if (track.kind === "audio") {
    sink.ondata = ({ samples }) => {
      frames++;
      if (samples?.some((v) => v > 32 || v < -32) && audible++ === 0) onFirst();
    };
  } else {
    sink.onframe = () => { if (frames++ === 0) onFirst(); };
  }
  return {
    read: () => frames,
    audible: track.kind === "audio" ? () => audible : undefined,
    stop: () => sink.stop(),
  };
}
