// A stand-in for the companion's original app-server-broker.mjs in the tests' fake plugin tree
// (not the upstream file): it records that it ran, and with which arguments, in
// $FAKE_ORIGINAL_LOG, listens on --endpoint's unix socket, and on SIGTERM removes it and exits 0.
import fs from "node:fs";
import net from "node:net";
import process from "node:process";

const argv = process.argv.slice(2);
fs.appendFileSync(process.env.FAKE_ORIGINAL_LOG, `${JSON.stringify({ event: "original", argv, pid: process.pid })}\n`);
let endpoint = null;
argv.forEach((arg, index) => {
  if (arg === "--endpoint") endpoint = argv[index + 1];
  else if (arg.startsWith("--endpoint=")) endpoint = arg.slice("--endpoint=".length);
});
if (endpoint && endpoint.startsWith("unix:")) {
  const socketPath = endpoint.slice("unix:".length);
  const server = net.createServer((socket) => socket.end());
  server.listen(socketPath);
  process.on("SIGTERM", () => {
    server.close();
    try { fs.unlinkSync(socketPath); } catch {}
    process.exit(0);
  });
}
