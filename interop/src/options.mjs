// Command-line options shared by the Node peer (peer.mjs) and the browser
// driver (browser.mjs). Plain data out, so it can be handed to the page.

const USAGE = `usage: node peer.mjs --homeserver URL --user NAME --password PW --room ROOM_ID
         [--register] [--create-call] [--video|--voice] [--mute-audio] [--mute-video]
         [--screenshare] [--duration SECS] [--log-signalling] [--encrypted | --no-crypto]
         [--ice-server URI] [--log-level debug|info|warn|error|silent]
         [--media-interval MS] [--intent ring|prompt|room]
         [--candidate-ip IP[,IP...]]`;

const FLAGS = {
  "--register": "register",
  "--create-call": "createCall",
  "--mute-audio": "muteAudio",
  "--mute-video": "muteVideo",
  "--screenshare": "screenshare",
  "--log-signalling": "logSignalling",
  "--encrypted": "encrypted",
  "--no-crypto": "noCrypto",
};

const VALUES = {
  "--homeserver": "homeserver",
  "--user": "user",
  "--password": "password",
  "--room": "room",
  "--duration": "duration",
  "--log-level": "logLevel",
  "--ice-server": "iceServer",
  "--media-interval": "mediaInterval",
  "--intent": "intent",
};

export class UsageError extends Error {}

export function parseOptions(argv) {
  const opts = {
    callType: "video",
    duration: null,
    logLevel: "info",
    mediaInterval: 1000,
    intent: "prompt",
    candidateIps: [],
  };
  readArgs(argv, { flags: FLAGS, values: VALUES, usage: USAGE, opts, other: (arg) => {
    if (arg !== "--video" && arg !== "--voice") return false;
    opts.callType = arg.slice(2);
    return true;
  } });

  if (!["ring", "prompt", "room"].includes(opts.intent)) {
    throw new UsageError(`--intent must be ring, prompt or room\n${USAGE}`);
  }
  requireOptions(opts, ["homeserver", "user", "password", "room"], USAGE);
  if (opts.encrypted && opts.noCrypto) {
    throw new UsageError(`--encrypted needs crypto: it cannot go with --no-crypto\n${USAGE}`);
  }
  checkCommonOptions(opts);
  return opts;
}

/**
 * Reads `argv` into `opts`: `flags` (argument -> key set to true), `values`
 * (argument -> key set to the next argument), `--candidate-ip` (repeatable,
 * into `opts.candidateIps`), and whatever `other(arg)` takes (returns true).
 * Every key of `flags` starts false.
 */
export function readArgs(argv, { flags, values, usage, opts, other = () => false }) {
  for (const flag of Object.values(flags)) opts[flag] = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--help" || arg === "-h") throw new UsageError(usage);
    if (other(arg)) continue;
    if (arg === "--candidate-ip") {
      // Offer only UDP candidates on these addresses (repeatable).
      const value = argv[++i];
      if (value === undefined) throw new UsageError(`${arg} needs a value\n${usage}`);
      opts.candidateIps.push(value);
    } else if (flags[arg]) {
      opts[flags[arg]] = true;
    } else if (values[arg]) {
      const value = argv[++i];
      if (value === undefined) throw new UsageError(`${arg} needs a value\n${usage}`);
      opts[values[arg]] = value;
    } else {
      throw new UsageError(`unknown argument ${arg}\n${usage}`);
    }
  }
}

/** Throws a UsageError naming the first of `keys` missing in `opts`. */
export function requireOptions(opts, keys, usage) {
  for (const required of keys) {
    if (!opts[required]) throw new UsageError(`--${required} is required\n${usage}`);
  }
}

/**
 * Checks and converts the options both tools share: `duration` (positive),
 * `mediaInterval` (at least 10 ms), `candidateIps`, `logLevel`; trims the
 * homeserver URL.
 */
export function checkCommonOptions(opts) {
  if (opts.duration !== null) {
    opts.duration = Number(opts.duration);
    if (!(opts.duration > 0)) throw new UsageError(`--duration must be a positive number`);
  }
  opts.mediaInterval = Number(opts.mediaInterval);
  if (!(opts.mediaInterval >= 10)) throw new UsageError(`--media-interval must be at least 10 (ms)`);
  for (const ip of opts.candidateIps.flatMap((v) => v.split(","))) {
    if (!/^(\d{1,3}(\.\d{1,3}){3}|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*)$/.test(ip.trim())) {
      throw new UsageError(`--candidate-ip: not an IP address: ${ip}`);
    }
  }
  if (!["debug", "info", "warn", "error", "silent"].includes(opts.logLevel)) {
    throw new UsageError(`bad --log-level ${opts.logLevel}`);
  }
  opts.homeserver = opts.homeserver.replace(/\/+$/, "");
}
