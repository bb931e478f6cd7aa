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
  for (const flag of Object.values(FLAGS)) opts[flag] = false;

  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--help" || arg === "-h") throw new UsageError(USAGE);
    if (arg === "--video" || arg === "--voice") {
      opts.callType = arg.slice(2);
    } else if (arg === "--candidate-ip") {
      // Offer only UDP candidates on these addresses (repeatable).
      const value = argv[++i];
      if (value === undefined) throw new UsageError(`${arg} needs a value\n${USAGE}`);
      opts.candidateIps.push(value);
    } else if (FLAGS[arg]) {
      opts[FLAGS[arg]] = true;
    } else if (VALUES[arg]) {
      const value = argv[++i];
      if (value === undefined) throw new UsageError(`${arg} needs a value\n${USAGE}`);
      opts[VALUES[arg]] = value;
    } else {
      throw new UsageError(`unknown argument ${arg}\n${USAGE}`);
    }
  }

  if (!["ring", "prompt", "room"].includes(opts.intent)) {
    throw new UsageError(`--intent must be ring, prompt or room\n${USAGE}`);
  }
  for (const required of ["homeserver", "user", "password", "room"]) {
    if (!opts[required]) throw new UsageError(`--${required} is required\n${USAGE}`);
  }
  if (opts.encrypted && opts.noCrypto) {
    throw new UsageError(`--encrypted needs crypto: it cannot go with --no-crypto\n${USAGE}`);
  }
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
  return opts;
}
