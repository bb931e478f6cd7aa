// A child process that prints JSON lines (a focus client, a peer), for the
// tools: its stdout lines are kept as events (and written to
// LOGDIR/NAME.jsonl), its stderr goes to LOGDIR/NAME.stderr.log; waitFor
// resolves with the first event matching a predicate.

import { spawn } from "node:child_process";
import { createWriteStream } from "node:fs";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");

export class Proc {
  constructor(name, logDir, args, { cwd = ROOT, command = process.execPath, env = process.env } = {}) {
    this.name = name;
    this.events = [];
    this.waiters = new Set();
    this.proc = spawn(command, args, { cwd, env, stdio: ["pipe", "pipe", "pipe"] });
    this.proc.stderr.pipe(createWriteStream(join(logDir, `${name}.stderr.log`)));
    const log = createWriteStream(join(logDir, `${name}.jsonl`));
    createInterface({ input: this.proc.stdout }).on("line", (line) => {
      log.write(line + "\n");
      let ev;
      try { ev = JSON.parse(line); } catch { ev = { event: "garbage", line }; }
      this.events.push(ev);
      if (ev.event === "error") process.stderr.write(`[${name}] error: ${ev.message}\n`);
      this.poke();
    });
    this.exited = new Promise((resolve) => this.proc.on("exit", (code, signal) => resolve({ code, signal })));
  }
  poke() {
    for (const w of this.waiters) {
      const ev = this.events.find(w.pred);
      if (!ev) continue;
      this.waiters.delete(w);
      clearTimeout(w.timer);
      w.resolve(ev);
    }
  }
  waitFor(what, pred, timeout = 30000) {
    return new Promise((resolve, reject) => {
      const w = { pred, resolve };
      w.timer = setTimeout(() => { this.waiters.delete(w); reject(new Error(`${this.name}: timed out waiting for ${what}`)); }, timeout);
      this.waiters.add(w);
      this.poke();
    });
  }
  send(line) { this.proc.stdin.write(line + "\n"); }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * One JSON line per step on stdout: `out(obj)` prints one; `expect(what,
 * ok, detail?)` prints `{expect, ok, detail}` and remembers a failure in
 * `failures`.
 */
export function expectations() {
  const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
  const failures = [];
  const expect = (what, ok, detail = undefined) => {
    out({ expect: what, ok: !!ok, ...(detail === undefined ? {} : { detail }) });
    if (!ok) failures.push(what);
  };
  return { out, expect, failures };
}
