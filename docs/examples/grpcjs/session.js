#!/usr/bin/env node
// A worked codex-broker Session with @grpc/grpc-js (see docs/CLIENTS.md): initialize, start a
// thread, run one turn, print every message the broker sends (one JSON line each; a message over
// 1000 characters as {"id", "bytes"}), and end the Session once the turn has completed.
//
//   node session.js ENDPOINT PROMPT [METHOD PARAMS_JSON]
//
// ENDPOINT: unix:/path/to/s.sock, or tcp:HOST:PORT with the token in $CODEX_BROKER_TOKEN.
// METHOD PARAMS_JSON: one more request after the turn (thread/read, say); its size goes to stderr.
// EXAMPLE_DEFAULT_LIMITS=1 leaves grpc-js's default 4 MiB receive limit in place, to show the
// failure that the channel options below prevent.
// Exit 0 when the Session ended OK, 1 otherwise (the final status goes to stderr).
'use strict';
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = process.env.CODEX_BROKER_PROTO || path.join(__dirname, '..', '..', '..', 'protos', 'broker.proto');
const definition = protoLoader.loadSync(PROTO, {keepCase: true, defaults: true});
const {AppServer} = grpc.loadPackageDefinition(definition).codexbroker.v1;

// The limits every client must set. The broker sends results of many MB (a long thread's
// history) as one message: with grpc-js's default 4 MiB receive limit, one of them ends the
// whole Session with RESOURCE_EXHAUSTED. It accepts up to 64 MiB per client message.
const CHANNEL_OPTIONS = {
  'grpc.max_receive_message_length': -1,
  'grpc.max_send_message_length': 64 * 1024 * 1024,
};

function target(endpoint) {
  if (endpoint.startsWith('unix:')) return endpoint; // grpc-js takes unix:/absolute/path as it is
  if (endpoint.startsWith('tcp:')) return endpoint.slice('tcp:'.length);
  throw new Error(`endpoint must be unix:PATH or tcp:HOST:PORT, not ${endpoint}`);
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);
}

async function main([endpoint, prompt, extraMethod, extraParams]) {
  const options = process.env.EXAMPLE_DEFAULT_LIMITS === '1' ? {} : CHANNEL_OPTIONS;
  const client = new AppServer(target(endpoint), grpc.credentials.createInsecure(), options);
  const metadata = new grpc.Metadata();
  if (process.env.CODEX_BROKER_TOKEN) metadata.set('authorization', `Bearer ${process.env.CODEX_BROKER_TOKEN}`);
  const call = client.Session(metadata);

  const waiting = new Map(); // request id -> resolve
  let nextId = 1;
  let onNotification = () => {};
  const send = (msg) => call.write({message: JSON.stringify(msg)});
  const request = (method, params) => new Promise((resolve) => {
    const id = nextId++;
    waiting.set(id, resolve);
    send({id, method, params});
  });

  call.on('data', (frame) => { // one ServerFrame: one or more messages, in the app-server's order
    for (const text of frame.messages) {
      const msg = JSON.parse(text);
      console.log(text.length > 1000 ? JSON.stringify({id: msg.id, bytes: text.length}) : text);
      if ('method' in msg && 'id' in msg) { // a server request (an approval): this example declines it
        send({id: msg.id, error: {code: -32000, message: 'declined by the example client'}});
      } else if ('id' in msg) {
        const resolve = waiting.get(msg.id);
        waiting.delete(msg.id);
        if (resolve) resolve(msg);
      } else {
        onNotification(msg);
      }
    }
  });
  const ended = new Promise((resolve) => {
    call.on('error', () => {}); // the final status comes with 'status' too
    call.on('status', resolve);
  });

  const work = (async () => {
    await request('initialize', {clientInfo: {name: 'grpcjs-example', version: '1'}, capabilities: {}});
    send({method: 'initialized'});
    const started = await request('thread/start', {cwd: process.cwd()});
    const threadId = started.result.thread.id;
    const completed = new Promise((resolve) => {
      onNotification = (msg) => {
        if (msg.method === 'turn/completed' && msg.params.threadId === threadId) resolve(msg);
      };
    });
    const turn = await request('turn/start', {threadId, input: [{type: 'text', text: prompt}]});
    if (turn.error) throw new Error(`turn/start failed: ${JSON.stringify(turn.error)}`);
    await completed;
    if (extraMethod) {
      const reply = await request(extraMethod, JSON.parse(extraParams || '{}'));
      console.error(`${extraMethod}: ${JSON.stringify(reply).length} bytes`);
    }
    call.end(); // half-close: the broker ends the Session once our work is done
  })();

  const status = await Promise.race([ended, work.then(() => ended)]);
  console.error(`session ended: ${statusName(status.code)} ${status.details}`);
  client.close();
  return status.code === grpc.status.OK ? 0 : 1;
}

main(process.argv.slice(2)).then((code) => process.exit(code), (err) => {
  console.error(err);
  process.exit(1);
});
