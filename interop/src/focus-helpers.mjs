// Pure helpers of the MSC3898 focus client (src/focus-page.mjs), also used
// by tools/focus-check.mjs.

/**
 * Our member content: `existing` with our device `ourDevice` removed
 * everywhere (and expired devices, and call entries left empty), then
 * `device` (our entry) added to `confId` when given. Keys we do not know are
 * kept. The same edit as groupcall-proto's membership.rs.
 */
export function memberContent(existing, confId, ourDevice, device, now) {
  const obj = existing && typeof existing === "object" ? { ...existing } : {};
  const calls = Array.isArray(obj["m.calls"]) ? obj["m.calls"].map((c) => ({ ...c })) : [];
  const kept = [];
  for (const call of calls) {
    const devices = Array.isArray(call["m.devices"]) ? call["m.devices"] : null;
    if (devices) {
      const left = devices.filter((d) => d?.device_id !== ourDevice &&
        !(typeof d?.expires_ts === "number" && d.expires_ts <= now));
      if (devices.length > 0 && left.length === 0) continue;
      call["m.devices"] = left;
    }
    kept.push(call);
  }
  if (device && confId) {
    const entry = kept.find((c) => c["m.call_id"] === confId);
    if (entry) entry["m.devices"] = [...(entry["m.devices"] ?? []), device];
    else kept.push({ "m.call_id": confId, "m.devices": [device] });
  }
  obj["m.calls"] = kept;
  return obj;
}

/**
 * mid -> { kind, direction, stream_id, track_id } of each m-section of an
 * SDP (`direction` as the SDP's author says, `inactive` for a rejected
 * section; ids from `a=msid`, null without).
 */
export function sdpSections(sdp) {
  const out = new Map();
  for (const section of String(sdp ?? "").split(/\r?\nm=/).slice(1)) {
    const kind = /^(\w+)/.exec(section)?.[1];
    const mid = /\na=mid:(\S+)/.exec(section)?.[1];
    if (!mid) continue;
    const msid = /\na=msid:(\S+) (\S+)/.exec(section);
    // A section with port 0 is rejected: nothing flows.
    const rejected = /^\w+ 0 /.test(section);
    const direction = rejected ? "inactive" : /\na=(sendrecv|sendonly|recvonly|inactive)\b/.exec(section)?.[1] ?? "sendrecv";
    out.set(mid, { kind, direction, stream_id: msid?.[1] ?? null, track_id: msid?.[2] ?? null });
  }
  return out;
}
