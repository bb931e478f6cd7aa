// The peer inside headless Chromium: same logic as the Node peer, with the
// browser's own WebRTC and Chromium's fake capture devices
// (--use-fake-device-for-media-stream). Bundled by src/build-browser.mjs and
// driven by browser.mjs (src/chromium.mjs) through the bindings of
// src/page-glue.mjs.

import * as sdk from "matrix-js-sdk";
import { startPeer, errorMessage } from "./peer-core.mjs";
import { emit, installPageGlue } from "./page-glue.mjs";

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

const started = installPageGlue();

async function main() {
  const platform = {
    countFrames,
    cleanup: () => {
      for (const t of canvasTimers) clearInterval(t);
    },
  };
  let peer;
  try {
    peer = await startPeer({ sdk, opts: window.__peerOpts, platform, emit });
  } catch (e) {
    emit({ event: "error", message: errorMessage(e) });
    window.__peerExit(1);
    return;
  }
  started(peer);
}

main();
