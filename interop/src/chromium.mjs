// Runs a page script in headless Chromium for the interop tools: bundles
// `entry` (a module under src/) with the SDK into a fresh temporary
// directory, serves it and the crypto WebAssembly on a loopback port, drives
// Debian's chromium with playwright-core, and wires the page to the process:
// JSON lines out on stdout, the page console on stderr, stdin commands in,
// signals and --duration for a clean shutdown. Shared by browser.mjs (the
// reference GroupCall) and focus-client.mjs (the MSC3898 focus client).
//
// The page talks to us through window.__peerOpts (the parsed options),
// window.__peerEmit(json), window.__peerExit(code), and is driven through
// window.__peerCommand(line) and window.__peerShutdown(code, reason).
//
//   CHROMIUM=/usr/bin/chromium (default) selects the browser binary.

import { createServer } from "node:http";
import { fstatSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";
import { buildBrowserBundle, wasmPath } from "./build-browser.mjs";
import { errorMessage } from "./peer-core.mjs";

const CHROMIUM_FLAGS = [
  "--no-sandbox",
  "--use-fake-device-for-media-stream",
  "--use-fake-ui-for-media-stream",
  "--autoplay-policy=no-user-gesture-required",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];
const LOG_ORDER = ["debug", "info", "warn", "error", "silent"];
const CONSOLE_LEVEL = { debug: "debug", log: "debug", trace: "debug", info: "info", warning: "warn", error: "error" };

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

function serve(dir) {
  const files = {
    "/": ["text/html", join(dir, "index.html")],
    "/peer.js": ["text/javascript", join(dir, "peer.js")],
    "/pkg/matrix_sdk_crypto_wasm_bg.wasm": ["application/wasm", wasmPath()],
  };
  const server = createServer((req, res) => {
    const file = files[new URL(req.url, "http://x").pathname];
    if (!file) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": file[0], "cache-control": "no-store" });
    res.end(readFileSync(file[1]));
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

export async function runInChromium({ entry, parseOptions, UsageError }) {
  let opts;
  try {
    opts = parseOptions(process.argv.slice(2));
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    process.stderr.write(e.message + "\n");
    emit({ event: "error", message: e.message.split("\n")[0] });
    process.exit(2);
  }
  const minLevel = LOG_ORDER.indexOf(opts.logLevel);

  const work = mkdtempSync(join(tmpdir(), "groupcall-browser-"));
  let context = null;
  let server = null;
  let finished = false;
  const finish = async (code) => {
    if (finished) return;
    finished = true;
    await context?.close().catch(() => {});
    server?.close();
    rmSync(work, { recursive: true, force: true });
    process.stdout.write("", () => process.exit(code));
  };
  const fail = (e) => {
    emit({ event: "error", message: errorMessage(e) });
    return finish(1);
  };

  try {
    await buildBrowserBundle(join(work, "site"), entry);
    server = await serve(join(work, "site"));
    context = await chromium.launchPersistentContext(join(work, "profile"), {
      executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
      headless: true,
      args: CHROMIUM_FLAGS,
      // We handle the signals: leave the call first, then close the browser.
      handleSIGINT: false,
      handleSIGTERM: false,
      handleSIGHUP: false,
    });
  } catch (e) {
    return fail(e);
  }

  const page = context.pages()[0] ?? (await context.newPage());
  let exitCode = null;
  let onExit;
  const exited = new Promise((resolve) => { onExit = resolve; });
  await page.exposeFunction("__peerEmit", (line) => process.stdout.write(line + "\n"));
  await page.exposeFunction("__peerExit", (code) => { exitCode = code; onExit(code); });
  page.on("console", (msg) => {
    if (LOG_ORDER.indexOf(CONSOLE_LEVEL[msg.type()] ?? "info") >= minLevel) process.stderr.write(`[page] ${msg.text()}\n`);
  });
  page.on("pageerror", (e) => process.stderr.write(`[page] uncaught: ${errorMessage(e)}\n`)); // the page reports it
  page.on("crash", () => fail(new Error("page crashed")));
  await page.addInitScript((o) => { window.__peerOpts = o; }, opts);

  // Leave the call cleanly, then close the browser.
  let stopping = false;
  const stop = async (code, reason) => {
    if (stopping) return;
    stopping = true;
    try {
      await Promise.race([
        page.evaluate(([c, r]) => window.__peerShutdown(c, r), [code, reason]),
        exited,
      ]);
    } catch (e) {
      if (exitCode === null) emit({ event: "error", message: `shutdown: ${errorMessage(e)}` });
    }
    await finish(exitCode ?? code);
  };
  process.on("SIGTERM", () => stop(0, "SIGTERM"));
  process.on("SIGINT", () => stop(0, "SIGINT"));
  if (opts.duration) setTimeout(() => stop(0, "duration"), opts.duration * 1000);
  exited.then((code) => { if (!stopping) finish(code); });

  try {
    const { port } = server.address();
    await page.goto(`http://127.0.0.1:${port}/`);
  } catch (e) {
    return fail(e);
  }

  // stdin commands, as for peer.mjs (ignored when stdin is /dev/null).
  const st = fstatSync(0);
  if (st.isFIFO() || st.isSocket() || process.stdin.isTTY) {
    const lines = createInterface({ input: process.stdin });
    let chain = Promise.resolve();
    lines.on("line", (line) => {
      if (line.trim().toLowerCase() === "quit") return void stop(0, "quit");
      chain = chain.then(() => page.evaluate((l) => window.__peerCommand(l), line)).catch((e) => {
        if (!stopping) emit({ event: "error", message: `command: ${errorMessage(e)}` });
      });
    });
    lines.on("close", () => chain.then(() => stop(0, "stdin closed")));
  }
}
