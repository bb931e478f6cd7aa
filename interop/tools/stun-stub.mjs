// A tiny STUN binding responder on loopback that answers late and with a
// made-up mapped address (127.0.0.2, the request's port). It exists to make
// the reference peer trickle a candidate in m.call.candidates: on loopback
// every host candidate is gathered before the SDK sends its invite/answer
// (it waits 200 ms), so without a late server-reflexive candidate the
// reference never sends m.call.candidates at all. The fake address is on
// loopback, so connectivity checks against it stay on this machine.

import { createSocket } from "node:dgram";

const MAGIC = 0x2112a442;
const BINDING_REQUEST = 0x0001;
const BINDING_SUCCESS = 0x0101;
const XOR_MAPPED_ADDRESS = 0x0020;

export async function startStunStub({ delayMs = 400, mappedAddress = "127.0.0.2" } = {}) {
  const socket = createSocket("udp4");
  const timers = new Set();
  socket.on("message", (msg, rinfo) => {
    if (msg.length < 20 || msg.readUInt16BE(0) !== BINDING_REQUEST || msg.readUInt32BE(4) !== MAGIC) return;
    const res = Buffer.alloc(32);
    res.writeUInt16BE(BINDING_SUCCESS, 0);
    res.writeUInt16BE(12, 2); // one attribute: 4 header + 8 value bytes
    res.writeUInt32BE(MAGIC, 4);
    msg.copy(res, 8, 8, 20); // transaction id
    res.writeUInt16BE(XOR_MAPPED_ADDRESS, 20);
    res.writeUInt16BE(8, 22);
    res.writeUInt8(0, 24);
    res.writeUInt8(1, 25); // IPv4
    res.writeUInt16BE(rinfo.port ^ (MAGIC >>> 16), 26);
    const ip = mappedAddress.split(".").reduce((acc, b) => (acc << 8) | Number(b), 0) >>> 0;
    res.writeUInt32BE((ip ^ MAGIC) >>> 0, 28);
    const timer = setTimeout(() => {
      timers.delete(timer);
      socket.send(res, rinfo.port, rinfo.address);
    }, delayMs);
    timers.add(timer);
  });
  await new Promise((resolve) => socket.bind(0, "127.0.0.1", resolve));
  const { port } = socket.address();
  return {
    uri: `stun:127.0.0.1:${port}`,
    stop: () => {
      for (const t of timers) clearTimeout(t);
      socket.close();
    },
  };
}
