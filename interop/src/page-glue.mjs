// The page side of src/chromium.mjs's bindings, shared by the pages it runs
// (browser-page.mjs, focus-page.mjs):
//   window.__peerOpts            options (from the command line)
//   window.__peerEmit(json)      one JSON line out
//   window.__peerExit(code)      the page has finished
//   window.__peerCommand(line)   a stdin command (set here)
//   window.__peerShutdown(c, r)  leave cleanly, then exit (set here)

import { errorMessage } from "./peer-core.mjs";

/** One JSON line out on the driver's stdout. */
export const emit = (obj) => window.__peerEmit(JSON.stringify(obj));

/**
 * Installs window.__peerCommand and window.__peerShutdown, and makes every
 * uncaught failure end the page with an `error` line. Returns
 * `started(controller)`, to call once the page's controller
 * (`{ command(line), shutdown(code, reason) -> exit code }`) is up: commands
 * wait for it, and a shutdown during startup waits for it (at most 10 s) so
 * that a peer that has just entered still leaves cleanly.
 */
export function installPageGlue() {
  let controller = null;
  let resolveStarted;
  const peerStarted = new Promise((resolve) => { resolveStarted = resolve; });
  let chain = Promise.resolve();
  window.__peerCommand = (line) => {
    chain = chain.then(async () => (await peerStarted).command(line));
    return chain;
  };
  window.__peerShutdown = async (code, reason) => {
    const up = controller ?? (await Promise.race([peerStarted, new Promise((r) => setTimeout(r, 10000, null))]));
    window.__peerExit(up ? await up.shutdown(code, reason) : code);
  };
  window.addEventListener("unhandledrejection", (ev) => {
    emit({ event: "error", message: errorMessage(ev.reason) });
    window.__peerShutdown(1, "unhandled rejection");
  });
  window.addEventListener("error", (ev) => {
    emit({ event: "error", message: errorMessage(ev.error ?? ev.message) });
    window.__peerShutdown(1, "uncaught exception");
  });
  return (c) => {
    controller = c;
    resolveStarted(c);
  };
}
