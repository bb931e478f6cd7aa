#!/usr/bin/env node
// The reference peer in headless Chromium. Same options, same JSON lines on
// stdout and same stdin commands as peer.mjs; the page's console goes to
// stderr. The driver (bundle, serve, chromium via playwright-core) is
// src/chromium.mjs.
//
//   CHROMIUM=/usr/bin/chromium (default) selects the browser binary.

import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { parseOptions, UsageError } from "./src/options.mjs";
import { runInChromium } from "./src/chromium.mjs";
import { errorMessage } from "./src/peer-core.mjs";

const entry = join(dirname(fileURLToPath(import.meta.url)), "src", "browser-page.mjs");
runInChromium({ entry, parseOptions, UsageError }).catch((e) => {
  process.stdout.write(JSON.stringify({ event: "error", message: errorMessage(e) }) + "\n");
  process.exit(1);
});
