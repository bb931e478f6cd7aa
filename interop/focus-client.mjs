#!/usr/bin/env node
// The MSC3898 focus client in headless Chromium: a call participant that
// publishes and subscribes through a focus only, with the browser's own
// RTCPeerConnection and data channel (src/focus-page.mjs). JSON lines on
// stdout, the page console on stderr, stdin commands; see README.md,
// "The MSC3898 focus client". The driver is src/chromium.mjs.
//
//   CHROMIUM=/usr/bin/chromium (default) selects the browser binary.

import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { parseOptions, UsageError } from "./src/focus-options.mjs";
import { runInChromium } from "./src/chromium.mjs";
import { errorMessage } from "./src/peer-core.mjs";

const entry = join(dirname(fileURLToPath(import.meta.url)), "src", "focus-page.mjs");
runInChromium({ entry, parseOptions, UsageError }).catch((e) => {
  process.stdout.write(JSON.stringify({ event: "error", message: errorMessage(e) }) + "\n");
  process.exit(1);
});
