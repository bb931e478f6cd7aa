#!/usr/bin/env node
// Reference MSC3401 peer in Node: matrix-js-sdk's legacy GroupCall over
// @roamhq/wrtc with synthetic media. JSON lines on stdout, SDK logs on
// stderr, commands on stdin. See README.md.

import { Console } from "node:console";
import { fstatSync } from "node:fs";
import { createInterface } from "node:readline";
import { parseOptions, UsageError } from "./src/options.mjs";
import { installShims, installMediaDevices, SyntheticMedia, countFrames } from "./src/node-platform.mjs";
import { startPeer, errorMessage } from "./src/peer-core.mjs";

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

// Everything the SDK logs goes to stderr, filtered by --log-level; stdout
// carries only our JSON lines. (The SDK's loglevel looks console up per call.)
function routeConsoleToStderr(level) {
  const order = ["debug", "info", "warn", "error", "silent"];
  const min = order.indexOf(level);
  const real = new Console({ stdout: process.stderr, stderr: process.stderr });
  const at = (lvl, fn) => (order.indexOf(lvl) >= min ? fn.bind(real) : () => {});
  globalThis.console = Object.assign(Object.create(real), {
    trace: at("debug", real.debug), debug: at("debug", real.debug), log: at("debug", real.log),
    info: at("info", real.info), warn: at("warn", real.warn), error: at("error", real.error),
  });
}

let exiting = false;
// Exit explicitly: letting Node wind down on its own with live wrtc sources
// can crash in native destructors.
function exit(code) {
  if (exiting) return;
  exiting = true;
  process.stdout.write("", () => process.exit(code));
}

function fail(e, code = 1) {
  emit({ event: "error", message: errorMessage(e) });
  exit(code);
}

async function main() {
  let opts;
  try {
    opts = parseOptions(process.argv.slice(2));
  } catch (e) {
    if (e instanceof UsageError) {
      process.stderr.write(e.message + "\n");
      return fail(new Error(e.message.split("\n")[0]), 2);
    }
    throw e;
  }
  routeConsoleToStderr(opts.logLevel);

  installShims();
  const media = new SyntheticMedia();
  installMediaDevices(media);
  // Import the SDK only now: it must see the polyfills and globals.
  const sdk = await import("matrix-js-sdk");

  // Stopping leaves the call cleanly; during startup it first waits (boundedly)
  // for the peer to be up, so that a peer that has just entered still leaves.
  let startup = null;
  let stopping = false;
  const stop = async (code, reason) => {
    if (stopping) return;
    stopping = true;
    let timer;
    const gaveUp = new Promise((resolve) => { timer = setTimeout(resolve, 10000, null); });
    const peer = startup && (await Promise.race([startup.catch(() => null), gaveUp]));
    clearTimeout(timer);
    if (peer) code = await peer.shutdown(code, reason);
    else media.stop();
    exit(code);
  };
  process.on("SIGTERM", () => stop(0, "SIGTERM"));
  process.on("SIGINT", () => stop(0, "SIGINT"));
  process.on("uncaughtException", (e) => { emit({ event: "error", message: errorMessage(e) }); stop(1, "uncaught exception"); });
  process.on("unhandledRejection", (e) => { emit({ event: "error", message: errorMessage(e) }); stop(1, "unhandled rejection"); });
  if (opts.duration) setTimeout(() => stop(0, "duration"), opts.duration * 1000);

  const platform = {
    countFrames,
    cleanup: () => media.stop(),
  };
  startup = startPeer({ sdk, opts, platform, emit });
  let peer;
  try {
    peer = await startup;
  } catch (e) {
    emit({ event: "error", message: errorMessage(e) });
    return stop(1, "startup failed");
  }
  if (stopping) return;

  // Commands on stdin when it is a pipe or terminal; its end means quit.
  // (/dev/null, as given by `spawn(..., {stdio: "ignore"})`, is ignored.)
  const st = fstatSync(0);
  if (st.isFIFO() || st.isSocket() || process.stdin.isTTY) {
    const lines = createInterface({ input: process.stdin });
    let chain = Promise.resolve();
    lines.on("line", (line) => {
      if (line.trim().toLowerCase() === "quit") chain = chain.then(() => stop(0, "quit"));
      else chain = chain.then(() => peer.command(line));
    });
    lines.on("close", () => chain.then(() => stop(0, "stdin closed")));
  }
}

main().catch((e) => fail(e));
