// Checks a groupcall-media peer against libwebrtc (@roamhq/wrtc) in Node:
//   node examples/wrtc-check.mjs answer|offer PATH/TO/sdp_stdio
// "answer": Node offers first and the Rust side answers; "offer": the other
// way. SCREENSHARE=1 makes the Rust side add/remove a screenshare stream;
// NODE_SCREENSHARE=1 makes Node do it (at 2.5 s / 5 s). Prints what each
// side received. Uses the @roamhq/wrtc installed by interop/ (npm ci there).
import { createRequire } from "node:module";
import { spawn } from "node:child_process";
import readline from "node:readline";
const require = createRequire(new URL("../../../interop/package.json", import.meta.url));
const wrtc = require("@roamhq/wrtc");
const { RTCPeerConnection, MediaStream } = wrtc;
const { RTCAudioSource, RTCVideoSource, RTCAudioSink, RTCVideoSink } = wrtc.nonstandard;

const mode = process.argv[2] || "answer";
const child = spawn(process.argv[3], [mode, "8"], { stdio: ["pipe", "pipe", "inherit"] });
const pc = new RTCPeerConnection({ iceServers: [] });
const send = (kind, sdp) => child.stdin.write(`${kind}\n${sdp}\nEND\n`);

// Synthetic sources: a sine and a flat frame whose luma changes.
const aSrc = new RTCAudioSource();
const vSrc = new RTCVideoSource();
const sSrc = new RTCVideoSource();
const stream = new MediaStream([aSrc.createTrack(), vSrc.createTrack()]);
for (const t of stream.getTracks()) pc.addTrack(t, stream);
const samples = new Int16Array(480);
let t = 0;
const frame = new Uint8ClampedArray(320 * 240 * 1.5);
let n = 0;
const timers = [
  setInterval(() => {
    for (let i = 0; i < 480; i++) samples[i] = 8000 * Math.sin((2 * Math.PI * 300 * t++) / 48000);
    aSrc.onData({ samples, sampleRate: 48000, bitsPerSample: 16, channelCount: 1, numberOfFrames: 480 });
  }, 10),
  setInterval(() => {
    frame.fill((n++ * 7) % 255, 0, 320 * 240);
    vSrc.onFrame({ width: 320, height: 240, data: frame });
    sSrc.onFrame({ width: 320, height: 240, data: frame });
  }, 66),
];

const counts = { audio: 0, video: {}, size: null, tracks: [], removed: [] };
pc.ontrack = (e) => {
  const sid = e.streams[0]?.id;
  counts.tracks.push(`${sid} ${e.track.kind}`);
  console.log("node ontrack", sid, e.track.kind);
  if (e.track.kind === "audio") {
    new RTCAudioSink(e.track).ondata = () => counts.audio++;
  } else {
    new RTCVideoSink(e.track).onframe = ({ frame }) => {
      counts.video[sid] = (counts.video[sid] || 0) + 1;
      counts.size = `${frame.width}x${frame.height}`;
    };
  }
};
pc.onconnectionstatechange = () => console.log("node state", pc.connectionState);

let offering = false;
async function offer() {
  offering = true;
  await pc.setLocalDescription(await pc.createOffer());
  send("OFFER", pc.localDescription.sdp);
}

let kind = null;
let lines = [];
readline.createInterface({ input: child.stdout }).on("line", async (l) => {
  if (!kind) {
    if (l === "OFFER" || l === "ANSWER") kind = l;
    else console.log("rust:", l);
    return;
  }
  if (l !== "END") return void lines.push(l);
  const sdp = lines.join("\r\n") + "\r\n";
  const k = kind;
  kind = null;
  lines = [];
  if (k === "OFFER") {
    await pc.setRemoteDescription({ type: "offer", sdp });
    await pc.setLocalDescription(await pc.createAnswer());
    send("ANSWER", pc.localDescription.sdp);
  } else {
    await pc.setRemoteDescription({ type: "answer", sdp });
    offering = false;
  }
  console.log(`node handled ${k}; transceivers:`, pc.getTransceivers().map((x) => `${x.mid}:${x.currentDirection}`).join(" "));
});

if (mode === "answer") await offer();
if (process.env.NODE_SCREENSHARE === "1") {
  let sender;
  setTimeout(async () => {
    const screen = new MediaStream([sSrc.createTrack()]);
    console.log("node adds screenshare", screen.id);
    sender = pc.addTrack(screen.getTracks()[0], screen);
    await offer();
  }, 2500);
  setTimeout(async () => {
    console.log("node removes screenshare");
    pc.removeTrack(sender);
    await offer();
  }, 5000);
}
const t0 = Date.now();
setTimeout(() => console.log("node received after", (Date.now() - t0) / 1000, "s:", JSON.stringify(counts)), 7500);
child.on("exit", () => {
  timers.forEach(clearInterval);
  setTimeout(() => process.exit(0), 200);
});
