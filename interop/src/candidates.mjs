// ICE candidate helpers of the reference peer, shared by Node and the
// browser page:
// - restricting the candidates it offers (--candidate-ip), so that a
//   benchmark can make it offer exactly what groupcall offers;
// - reporting what became of every remote candidate it was given
//   (--log-signalling), so that a test can check it added all of them.

/** Parses `--candidate-ip` values ("127.0.0.1" or "127.0.0.1,::1"). */
export function parseCandidateIps(values) {
  const ips = new Set();
  for (const v of values) {
    for (const ip of String(v).split(",")) {
      const s = ip.trim();
      if (s) ips.add(s.toLowerCase());
    }
  }
  return ips;
}

/**
 * Whether a candidate line (`candidate:...`, with or without `a=`) is a UDP
 * candidate on one of `ips`. An empty line (end of candidates) is kept.
 */
export function keepCandidate(line, ips) {
  const text = String(line ?? "").trim().replace(/^a=/, "");
  if (text === "") return true;
  // candidate:<foundation> <component> <transport> <priority> <address> <port> typ ...
  const f = text.split(/\s+/);
  return f.length >= 8 && f[2].toLowerCase() === "udp" && ips.has(f[4].toLowerCase());
}

function filterSdp(sdp, ips) {
  if (typeof sdp !== "string") return sdp;
  const eol = sdp.includes("\r\n") ? "\r\n" : "\n";
  return sdp
    .split(eol)
    .filter((l) => !l.startsWith("a=candidate:") || keepCandidate(l, ips))
    .join(eol);
}

/**
 * The content of an outgoing `m.call.*` message with every candidate that is
 * not a UDP candidate on `ips` removed: from the SDP of an invite, answer or
 * negotiate, and from the list of `m.call.candidates`. (The message itself is
 * still sent, possibly with an empty list: it carries a `seq` the receiver
 * waits for.) Returns a new object; `content` is left as it is.
 */
export function restrictCandidates(eventType, content, ips) {
  if (!ips || ips.size === 0 || !content || typeof content !== "object") return content;
  const out = { ...content };
  for (const key of ["offer", "answer", "description"]) {
    if (out[key] && typeof out[key] === "object") out[key] = { ...out[key], sdp: filterSdp(out[key].sdp, ips) };
  }
  if (eventType === "m.call.candidates" && Array.isArray(out.candidates)) {
    out.candidates = out.candidates.filter((c) => keepCandidate(c?.candidate, ips));
  }
  return out;
}

/**
 * Reports every `addIceCandidate` of peer connections made from `PC` (the
 * class matrix-js-sdk instantiates) as one `remote_candidate` line:
 * `candidate` (the text; "" for end of candidates), `sdp_mid`, `ok`, and
 * `message` when it failed. Patches `PC.prototype` once.
 */
export function reportRemoteCandidates(PC, emit) {
  const marker = Symbol.for("groupcall-interop.reportRemoteCandidates");
  if (!PC?.prototype || PC.prototype[marker]) return;
  const add = PC.prototype.addIceCandidate;
  PC.prototype.addIceCandidate = async function addIceCandidate(candidate, ...rest) {
    const line = { event: "remote_candidate", candidate: candidate?.candidate ?? "", sdp_mid: candidate?.sdpMid ?? null };
    try {
      const r = await add.call(this, candidate, ...rest);
      emit({ ...line, ok: true });
      return r;
    } catch (e) {
      emit({ ...line, ok: false, message: e?.message ?? String(e) });
      throw e;
    }
  };
  PC.prototype[marker] = true;
}
