// Command-line options of the MSC3898 focus client (focus-client.mjs).
// Plain data out, so it can be handed to the page.

import { UsageError, checkCommonOptions, readArgs, requireOptions } from "./options.mjs";

export const USAGE = `usage: node focus-client.mjs --homeserver URL --user NAME --password PW --room ROOM_ID
         --focus @USER:SERVER/DEVICE
         [--register] [--create-call] [--plaintext] [--simulcast] [--scalability L1T1|L1T2|L1T3]
         [--camera WIDTHxHEIGHT@FPS] [--want WIDTHxHEIGHT] [--ice-server URI]
         [--candidate-ip IP[,IP...]] [--duration SECS] [--media-interval MS]
         [--ping-timeout MS] [--retries N] [--log-signalling]
         [--log-level debug|info|warn|error|silent]`;

const FLAGS = {
  "--register": "register",
  "--create-call": "createCall",
  "--plaintext": "plaintext",
  "--simulcast": "simulcast",
  "--log-signalling": "logSignalling",
};

const VALUES = {
  "--homeserver": "homeserver",
  "--user": "user",
  "--password": "password",
  "--room": "room",
  "--focus": "focus",
  "--duration": "duration",
  "--log-level": "logLevel",
  "--ice-server": "iceServer",
  "--media-interval": "mediaInterval",
  "--ping-timeout": "pingTimeout",
  "--retries": "retries",
  "--scalability": "scalability",
  "--camera": "camera",
  "--want": "want",
};

/** The VP8 temporal scalability modes Chromium encodes (`scalabilityMode`). */
export const SCALABILITY_MODES = ["L1T1", "L1T2", "L1T3"];

export { UsageError };

/** Splits `@user:server/DEVICE` at its last `/`. */
export function parseFocus(value) {
  const slash = value.lastIndexOf("/");
  const user = slash > 0 ? value.slice(0, slash) : "";
  const device = slash > 0 ? value.slice(slash + 1) : "";
  if (!/^@[^:\s]+:\S+$/.test(user) || !/^\S+$/.test(device)) {
    throw new UsageError(`--focus must be @USER:SERVER/DEVICE (the focus has no member entry: its device must be named), got ${value}`);
  }
  return { user_id: user, device_id: device };
}

/** Parses `WIDTHxHEIGHT@FPS` (the fake camera's getUserMedia constraints). */
export function parseCamera(value) {
  const m = /^(\d{2,4})x(\d{2,4})@(\d{1,2})$/.exec(value);
  const [width, height, frameRate] = m ? m.slice(1).map(Number) : [];
  if (!m || width < 16 || height < 16 || width > 1920 || height > 1080 || frameRate < 1 || frameRate > 60) {
    throw new UsageError(`--camera must be WIDTHxHEIGHT@FPS (at most 1920x1080@60), got ${value}`);
  }
  return { width, height, frameRate };
}

/** Parses `WIDTHxHEIGHT` (the size --want asks in our video subscriptions). */
export function parseSize(value) {
  const m = /^(\d{1,4})x(\d{1,4})$/.exec(value);
  const [width, height] = m ? m.slice(1).map(Number) : [];
  if (!m || width < 1 || height < 1) throw new UsageError(`--want must be WIDTHxHEIGHT, got ${value}`);
  return { width, height };
}

/** Parses the command line (throws UsageError with the usage text). */
export function parseOptions(argv) {
  const opts = {
    duration: null,
    logLevel: "info",
    mediaInterval: 1000,
    pingTimeout: 45000,
    retries: 3,
    candidateIps: [],
  };
  readArgs(argv, { flags: FLAGS, values: VALUES, usage: USAGE, opts });
  requireOptions(opts, ["homeserver", "user", "password", "room", "focus"], USAGE);
  opts.focus = parseFocus(opts.focus);
  for (const [key, min] of [["pingTimeout", 100], ["retries", 0]]) {
    opts[key] = Number(opts[key]);
    if (!Number.isInteger(opts[key]) || opts[key] < min) throw new UsageError(`--${key.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase())} must be an integer >= ${min}`);
  }
  if (opts.scalability !== undefined && !SCALABILITY_MODES.includes(opts.scalability)) {
    throw new UsageError(`--scalability must be one of ${SCALABILITY_MODES.join(", ")}, got ${opts.scalability}`);
  }
  opts.camera = parseCamera(opts.camera ?? "640x360@15");
  if (opts.want !== undefined) opts.want = parseSize(opts.want);
  checkCommonOptions(opts);
  return opts;
}
