// The peer inside headless Chromium: same logic as the Node peer, with the
// browser's own WebRTC and Chromium's fake capture devices
// (--use-fake-device-for-media-stream). Bundled by src/build-browser.mjs and
// driven by browser.mjs through three bindings:
//   window.__peerOpts            options (from browser.mjs's command line)
//   window.__peerEmit(json)      one JSON line out
//   window.__peerExit(code)      the peer has finished
// and one entry point, window.__peerCommand(line), for stdin commands.

import * as sdk from "matrix-js-sdk";
import { startPeer, errorMessage } from "./peer-core.mjs";

const emit = (obj) => window.__peerEmit(JSON.stringify(obj));

// A screen to share: headless Chromium has none (and getDisplayMedia wants a
// user gesture), so share a canvas with a moving pattern instead.
const canvasTimers = new Set();
navigator.mediaDevices.getDisplayMedia = async () => {
  const canvas = document.createElement("canvas");
  canvas.width = 640;
  canvas.height = 360;
  const ctx = canvas.getContext("2d");
  let tick = 0;
  const timer = setInterval(() => {
    tick++;
    ctx.fillStyle = "#203060";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = "#f0c040";
    ctx.fillRect((tick * 8) % canvas.width, 0, 24, canvas.height);
    ctx.fillText(`screen ${tick}`, 20, 20);
  }, 1000 / 15);
  canvasTimers.add(timer);
  const stream = canvas.captureStream(15);
  for (const track of stream.getTracks()) {
    const stop = track.stop.bind(track);
    track.stop = () => { clearInterval(timer); canvasTimers.delete(timer); stop(); };
  }
  return stream;
};

// Received media is rendered into muted elements (so Chromium decodes and
// plays it out); frames are counted from the receiver's stats.
const sinks = document.getElementById("sinks");
function countFrames(track, feed) {
  const el = document.createElement(track.kind === "video" ? "video" : "audio");
  el.autoplay = true;
  el.muted = true;
  el.srcObject = new MediaStream([track]);
  sinks.append(el);
  el.play().catch(() => {});
  let frames = 0;
  let audible = 0;
  return {
    read: async () => {
      const pc = feed.call?.peerConn;
      if (!pc || pc.signalingState === "closed") return frames;
      const stats = await pc.getStats(track);
      for (const s of stats.values()) {
        if (s.type !== "inbound-rtp") continue;
        // Video: decoded frames. Audio: 10 ms frames played out, as in Node.
        // (totalSamplesReceived counts 48 kHz samples for Opus.) Audible:
        // the samples that were not concealment.
        frames = track.kind === "video" ? s.framesDecoded ?? 0 : Math.floor((s.totalSamplesReceived ?? 0) / 480);
        audible = Math.floor(((s.totalSamplesReceived ?? 0) - (s.concealedSamples ?? 0)) / 480);
      }
      return frames;
    },
    audible: track.kind === "audio" ? () => audible : undefined,
    stop: () => el.remove(),
  };
}

let peer = null;
let started;
const peerStarted = new Promise((resolve) => { started = resolve; });
let chain = Promise.resolve();
window.__peerCommand = (line) => {
  chain = chain.then(async () => (await peerStarted).command(line));
  return chain;
};
// Like peer.mjs: during startup, wait (boundedly) for the peer to be up so a
// peer that has just entered still leaves cleanly.
window.__peerShutdown = async (code, reason) => {
  const up = peer ?? (await Promise.race([peerStarted, new Promise((r) => setTimeout(r, 10000, null))]));
  window.__peerExit(up ? await up.shutdown(code, reason) : code);
};

async function main() {
  const platform = {
    countFrames,
    cleanup: () => {
      for (const t of canvasTimers) clearInterval(t);
    },
  };
  try {
    peer = await startPeer({ sdk, opts: window.__peerOpts, platform, emit });
  } catch (e) {
    emit({ event: "error", message: errorMessage(e) });
    window.__peerExit(1);
    return;
  }
  started(peer);
}

// Every failure ends the peer with an error, as in Node.
window.addEventListener("unhandledrejection", (ev) => {
  emit({ event: "error", message: errorMessage(ev.reason) });
  window.__peerShutdown(1, "unhandled rejection");
});
window.addEventListener("error", (ev) => {
  emit({ event: "error", message: errorMessage(ev.error ?? ev.message) });
  window.__peerShutdown(1, "uncaught exception");
});
main();
