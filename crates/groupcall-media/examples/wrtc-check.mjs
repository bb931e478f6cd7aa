// Checks a groupcall-media peer against libwebrtc (@roamhq/wrtc) in Node:
// node examples/wrtc-check.mjs answer|offer PATH/TO/sdp_stdio
// (the Rust side answers or offers). Prints what each side received.
import { createRequire } from "node:module";
import { spawn } from "node:child_process";
import readline from "node:readline";
// Uses the @roamhq/wrtc installed by interop/ (npm ci there first).
const require = createRequire(new URL("../../../interop/package.json", import.meta.url));
const wrtc = require("@roamhq/wrtc");
const { RTCPeerConnection, MediaStream } = wrtc;
const { RTCAudioSource, RTCVideoSource, RTCAudioSink, RTCVideoSink } = wrtc.nonstandard;

const mode = process.argv[2] || "answer"; // what the Rust side does
const bin = process.argv[3];
const child = spawn(bin, [mode, "8"], { stdio: ["pipe", "pipe", "inherit"] });
const rl = readline.createInterface({ input: child.stdout });
let buf = []; let waiters = [];
rl.on("line", (l) => {
  if (l.startsWith("EVENT") || l.startsWith("STATS")) { console.log("rust:", l); return; }
  buf.push(l);
  if (l === "END") { const sdp = buf.slice(0, -1).join("\r\n") + "\r\n"; buf = []; waiters.shift()?.(sdp); }
});
const nextSdp = () => new Promise((r) => waiters.push(r));

const pc = new RTCPeerConnection({ iceServers: [] });
const aSrc = new RTCAudioSource(); const vSrc = new RTCVideoSource();
const aTrack = aSrc.createTrack(); const vTrack = vSrc.createTrack();
const stream = new MediaStream([aTrack, vTrack]);
console.log("node stream id", stream.id);
pc.addTrack(aTrack, stream); pc.addTrack(vTrack, stream);
const samples = new Int16Array(480);
let t = 0;
const ai = setInterval(() => { for (let i = 0; i < 480; i++) samples[i] = 8000 * Math.sin(2 * Math.PI * 300 * (t++) / 48000); aSrc.onData({ samples, sampleRate: 48000, bitsPerSample: 16, channelCount: 1, numberOfFrames: 480 }); }, 10);
const frame = new Uint8ClampedArray(320 * 240 * 1.5);
let n = 0;
const vi = setInterval(() => { frame.fill((n++ * 7) % 255, 0, 320 * 240); vSrc.onFrame({ width: 320, height: 240, data: frame }); }, 66);

const counts = { audio: 0, video: 0, size: null, tracks: [], per: {} };
pc.ontrack = (e) => {
  const sid = e.streams[0]?.id;
  counts.tracks.push(`${sid} ${e.track.kind}`);
  console.log("node ontrack", sid, e.track.kind);
  if (e.streams[0]) e.streams[0].onremovetrack = (ev) => { console.log("node removetrack", sid, ev.track.kind); counts.removed = (counts.removed || []).concat(sid); };
  if (e.track.kind === "audio") { const s = new RTCAudioSink(e.track); s.ondata = () => counts.audio++; }
  else { const s = new RTCVideoSink(e.track); s.onframe = ({ frame }) => { counts.video++; counts.size = `${frame.width}x${frame.height}`; counts.per[sid] = (counts.per[sid] || 0) + 1; }; }
};
pc.onconnectionstatechange = () => console.log("node state", pc.connectionState);
const gathered = () => new Promise((r) => { if (pc.iceGatheringState === "complete") r(); pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && r(); setTimeout(r, 2000); });

if (mode === "answer") {
  const offer = await pc.createOffer(); await pc.setLocalDescription(offer); await gathered();
  child.stdin.write(pc.localDescription.sdp + "\nEND\n");
  const answer = await nextSdp();
  await pc.setRemoteDescription({ type: "answer", sdp: answer });
} else {
  const offer = await nextSdp();
  await pc.setRemoteDescription({ type: "offer", sdp: offer });
  const answer = await pc.createAnswer(); await pc.setLocalDescription(answer); await gathered();
  child.stdin.write(pc.localDescription.sdp + "\nEND\n");
}
// Later SDPs from the Rust side are renegotiation offers.
(async () => {
  for (;;) {
    const offer = await nextSdp();
    await pc.setRemoteDescription({ type: "offer", sdp: offer });
    const answer = await pc.createAnswer(); await pc.setLocalDescription(answer);
    child.stdin.write(pc.localDescription.sdp + "\nEND\n");
    console.log("node answered a renegotiation; receivers:",
      pc.getTransceivers().map((t) => `${t.mid}:${t.currentDirection}`).join(" "));
  }
})();
const t0 = Date.now();
setTimeout(() => { console.log("node received after", (Date.now() - t0) / 1000, "s:", JSON.stringify(counts)); }, 7500);
child.on("exit", () => { clearInterval(ai); clearInterval(vi); setTimeout(() => process.exit(0), 200); });
