// Bundle a page script (default: the browser peer, src/browser-page.mjs) and
// matrix-js-sdk with esbuild into `outdir`, next to an index.html. The
// crypto WebAssembly is not bundled: the SDK fetches it from
// ./pkg/matrix_sdk_crypto_wasm_bg.wasm relative to the bundle, so serve
// `wasmPath()` there.

import { build } from "esbuild";
import { writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));

export function wasmPath() {
  const entry = fileURLToPath(import.meta.resolve("@matrix-org/matrix-sdk-crypto-wasm"));
  return join(dirname(entry), "pkg", "matrix_sdk_crypto_wasm_bg.wasm");
}

export async function buildBrowserBundle(outdir, entry = join(here, "browser-page.mjs")) {
  await build({
    entryPoints: [entry],
    outfile: join(outdir, "peer.js"),
    bundle: true,
    format: "esm",
    platform: "browser",
    target: "chrome120",
    sourcemap: "inline",
    define: { "process.env.NODE_ENV": '"production"' },
    logLevel: "warning",
  });
  writeFileSync(join(outdir, "index.html"), `<!doctype html>
<html><head><meta charset="utf-8"><title>groupcall interop peer</title></head>
<body><div id="sinks"></div><script type="module" src="peer.js"></script></body></html>
`);
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const outdir = process.argv[2] ?? join(here, "..", "dist");
  await buildBrowserBundle(outdir);
  process.stdout.write(`bundle written to ${outdir}\n`);
}
