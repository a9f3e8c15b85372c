#!/usr/bin/env node
// codex-broker companion launcher. Written by `codex-broker companion install` in place of the
// companion's app-server-broker.mjs; `codex-broker companion uninstall` restores the original.
//
// The companion runs this file as `node <it> serve --endpoint unix:<dir>/broker.sock --cwd <cwd>
// --pid-file <dir>/broker.pid` (options as `--k v` or `--k=v`). It runs codex-broker instead:
//   <codexBroker> serve --jsonl-endpoint unix:<dir>/broker.sock --endpoint unix:<dir>/<grpcSocketName>
//                       --instance-id <uuid> --cwd <cwd> --pid-file <dir>/broker.pid
// in this process's own group (the companion's SIGTERM to the group reaches both), forwarding
// SIGTERM, SIGINT and SIGHUP to it as SIGTERM (one drain request however many arrive; a group
// SIGINT plus a forwarded SIGINT would read as a person's second Ctrl-C), 200 ms later and only if
// it still runs, and exits with its status.
//
// It runs the original Node broker (kept beside this file as <original>) instead on Windows, for
// a pipe: or any non-unix endpoint, for arguments it does not know, and when codex-broker cannot
// start: a spawn error, or an exit before the JSONL socket accepts, within readyBudgetMs of this
// launcher's start. The budget leaves the fallback room inside the companion's 2 s readiness
// window; after it the launcher never falls back, because the companion has given up on this
// process by then and a Node broker started that late would never be stopped.
//
// When codex-broker has exited, the launcher removes the gRPC socket if the broker could not,
// and the directory if it is then empty: an empty directory means the companion has already
// deleted its own files there (its clean-up ran while the broker was still finishing turns).
import { spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import process from "node:process";
import { fileURLToPath, pathToFileURL } from "node:url";

const CONFIG = __CODEX_BROKER_CONFIG__;

const VALUE_OPTIONS = new Set(["endpoint", "cwd", "pid-file"]);
const FORWARDED_SIGNALS = ["SIGTERM", "SIGINT", "SIGHUP"];
const POLL_MS = 25;
const FORWARD_GRACE_MS = 200;

// The serve options, or null when the arguments are not exactly what this launcher understands.
export function parseServeArgs(argv) {
  if (argv[0] !== "serve") {
    return null;
  }
  const options = {};
  for (let index = 1; index < argv.length; index += 1) {
    const token = argv[index];
    if (!token.startsWith("--")) {
      return null;
    }
    const equals = token.indexOf("=");
    const key = equals === -1 ? token.slice(2) : token.slice(2, equals);
    if (!VALUE_OPTIONS.has(key) || key in options) {
      return null;
    }
    if (equals !== -1) {
      options[key] = token.slice(equals + 1);
    } else if (index + 1 < argv.length) {
      index += 1;
      options[key] = argv[index];
    } else {
      return null;
    }
  }
  return options;
}

// What to run: {mode: "original", reason} or {mode: "broker", args, jsonlPath, grpcPath, dir}.
export function plan(argv, platform, config = CONFIG, instanceId = "") {
  if (platform === "win32") {
    return { mode: "original", reason: "Windows" };
  }
  const options = parseServeArgs(argv);
  if (options === null) {
    return { mode: "original", reason: "arguments this launcher does not handle" };
  }
  const endpoint = options.endpoint ?? "";
  if (!endpoint.startsWith("unix:") || endpoint.length === "unix:".length) {
    return { mode: "original", reason: `endpoint ${JSON.stringify(endpoint)} is not unix:PATH` };
  }
  const jsonlPath = path.resolve(endpoint.slice("unix:".length));
  const dir = path.dirname(jsonlPath);
  const grpcPath = path.join(dir, config.grpcSocketName);
  if (grpcPath === jsonlPath) {
    return { mode: "original", reason: `the endpoint is the gRPC socket's own name ${config.grpcSocketName}` };
  }
  const args = ["serve", "--jsonl-endpoint", `unix:${jsonlPath}`, "--endpoint", `unix:${grpcPath}`,
    "--instance-id", instanceId || randomUUID()];
  if (options.cwd !== undefined) {
    args.push("--cwd", options.cwd);
  }
  if (options["pid-file"] !== undefined) {
    args.push("--pid-file", options["pid-file"]);
  }
  return { mode: "broker", args, jsonlPath, grpcPath, dir };
}

function note(text) {
  process.stderr.write(`codex-broker launcher[${process.pid}]: ${text}\n`);
}

function removeQuietly(file) {
  try {
    fs.unlinkSync(file);
  } catch {
    // already gone, or not ours to remove
  }
}

function accepts(socketPath) {
  return new Promise((resolve) => {
    const socket = net.createConnection({ path: socketPath });
    socket.on("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.on("error", () => resolve(false));
  });
}

async function runOriginal(reason) {
  const original = path.join(path.dirname(fileURLToPath(import.meta.url)), CONFIG.original);
  note(`${reason}: running the original Node broker ${original}`);
  await import(pathToFileURL(original).href);
}

// Exit as the broker did: with its status, or killed by its signal (128 + n if that one is ignored).
function exitLike(code, signal) {
  if (signal) {
    for (const name of FORWARDED_SIGNALS) {
      process.removeAllListeners(name);
    }
    process.kill(process.pid, signal);
    setTimeout(() => process.exit(128 + (os.constants.signals[signal] ?? 0)), 100);
    return;
  }
  process.exit(code ?? 1);
}

function runBroker(target) {
  const started = Date.now();
  let ready = false;
  let mayFallBack = true;
  let stopping = false;
  let settled = false;
  let child;

  // A signal sent to the whole group has reached the broker too: the forwarded copy waits a
  // moment and is sent only if the broker still runs, so a broker that stops at once is not hit
  // by a second SIGTERM while its interpreter exits (with the default action back in place).
  const budget = setTimeout(() => {
    mayFallBack = false;
  }, CONFIG.readyBudgetMs);
  let forwarding = null;
  const onSignal = () => {
    stopping = true;
    forwarding ??= setTimeout(() => {
      forwarding = null;
      if (child && child.exitCode === null && child.signalCode === null) {
        child.kill("SIGTERM");
      }
    }, FORWARD_GRACE_MS);
  };
  for (const name of FORWARDED_SIGNALS) {
    process.on(name, onSignal);
  }

  const giveUp = (reason) => {
    settled = true;
    mayFallBack = false;
    clearTimeout(budget);
    for (const name of FORWARDED_SIGNALS) {
      process.removeListener(name, onSignal);
    }
    // What the broker that is gone left on these paths, unless something else listens there.
    const clearStale = async () => {
      for (const file of [target.jsonlPath, target.grpcPath]) {
        if (!(await accepts(file))) {
          removeQuietly(file);
        }
      }
    };
    clearStale().then(() => runOriginal(reason)).catch((error) => {
      note(`the original Node broker failed: ${error instanceof Error ? error.message : String(error)}`);
      process.exit(1);
    });
  };

  const poll = async () => {
    while (!ready && !settled && mayFallBack) {
      if (await accepts(target.jsonlPath)) {
        ready = true;
        mayFallBack = false;
        clearTimeout(budget);
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  };

  try {
    child = spawn(CONFIG.codexBroker, target.args, { stdio: "inherit" });
  } catch (error) {
    child = null;
    giveUp(`cannot run codex-broker ${CONFIG.codexBroker}: ${error.message}`);
    return;
  }
  child.on("error", (error) => {
    if (settled || child.pid !== undefined) {
      return; // only a spawn error matters here (a failed kill is not one)
    }
    clearTimeout(budget);
    clearTimeout(forwarding);
    if (stopping) {
      settled = true;
      exitLike(0, null);
      return;
    }
    giveUp(`cannot run codex-broker ${CONFIG.codexBroker}: ${error.code ?? error.message}`);
  });
  child.on("exit", (code, signal) => {
    if (settled) {
      return;
    }
    clearTimeout(budget);
    clearTimeout(forwarding);
    const status = signal ? `signal ${signal}` : `status ${code}`;
    if (!ready && mayFallBack && !stopping && Date.now() - started <= CONFIG.readyBudgetMs) {
      giveUp(`codex-broker exited with ${status} before its JSONL socket accepted`);
      return;
    }
    settled = true;
    removeQuietly(target.grpcPath);
    try {
      fs.rmdirSync(target.dir);
    } catch {
      // not empty: the companion still has files there
    }
    exitLike(code, signal);
  });
  void poll();
}

function main() {
  const target = plan(process.argv.slice(2), process.platform);
  if (target.mode === "original") {
    runOriginal(target.reason).catch((error) => {
      note(`the original Node broker failed: ${error instanceof Error ? error.message : String(error)}`);
      process.exit(1);
    });
    return;
  }
  runBroker(target);
}

function realpathOrSelf(file) {
  try {
    return fs.realpathSync(file);
  } catch {
    return file;
  }
}

// Run when Node runs this file (not when a test imports it for plan()).
if (process.argv[1] && realpathOrSelf(process.argv[1]) === realpathOrSelf(fileURLToPath(import.meta.url))) {
  main();
}
