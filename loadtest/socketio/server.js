// The bench's socket.io reference: the least a socket.io 4 cluster does to fan a message out.
//
//   node loadtest/socketio/server.js --port 0 [--redis-url redis://127.0.0.1:6379/0] [--backlog 511]
//
// Packages come from the bench's cache (NODE_PATH=<cache>/node_modules, installed by
// `python -m loadtest.bench --socketio` with `npm ci` from package-lock.json), never from the repo.
//
// Dialect (what loadtest/sio.py speaks): WebSocket transport only, no compression. A client
// joins the room named by its handshake query `room=` (before socket.io answers its CONNECT, so
// it can receive as soon as it sees `40{...}`); an event `publish` with the bench's reference
// payload {"type": "publish", "room": ..., "data": {...}} is sent to the room, as is, as the event
// `message` with one io.to(room).emit(); an ack callback, when the publisher asked for one, is
// answered {"ok": true} once the emit returned (the Redis adapter publishes without waiting, so
// this ack means "accepted by this process", weaker than roomcast's). With --redis-url the
// processes share rooms through @socket.io/redis-adapter on the `redis` client; without it one
// process uses socket.io's in-memory adapter.
//
// GET /readyz answers 200 once the adapter is connected; the first line on stdout is
// `listening on ws://HOST:PORT`. SIGTERM or SIGINT closes the server and exits 0.
"use strict";

const http = require("node:http");
const { parseArgs } = require("node:util");
const { Server } = require("socket.io");

const { values: args } = parseArgs({
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string", default: "0" },
    "redis-url": { type: "string" },
    backlog: { type: "string", default: "511" },
  },
});

async function adapter(url) {
  if (!url) return undefined;
  const { createClient } = require("redis");
  const { createAdapter } = require("@socket.io/redis-adapter");
  const pub = createClient({ url });
  const sub = pub.duplicate();
  for (const client of [pub, sub]) {
    client.on("error", (err) => console.error(`redis: ${err.message}`));
  }
  await Promise.all([pub.connect(), sub.connect()]);
  return createAdapter(pub, sub);
}

async function main() {
  let ready = false;
  const httpServer = http.createServer((req, res) => {
    // socket.io handles /socket.io/ itself; everything else lands here.
    const ok = req.url === "/readyz" && ready;
    res.writeHead(ok ? 200 : 404, { "Content-Type": "text/plain" });
    res.end(ok ? "ready\n" : "not found\n");
  });
  const io = new Server(httpServer, {
    transports: ["websocket"],
    perMessageDeflate: false,
    httpCompression: false,
    serveClient: false,
    adapter: await adapter(args["redis-url"]),
  });

  io.use((socket, next) => {
    const room = socket.handshake.query.room;
    if (typeof room === "string" && room) socket.join(room);
    next();
  });

  io.on("connection", (socket) => {
    socket.on("publish", (msg, ack) => {
      if (msg && typeof msg.room === "string") io.to(msg.room).emit("message", msg);
      if (typeof ack === "function") ack({ ok: true });
    });
  });

  httpServer.listen(Number(args.port), args.host, Number(args.backlog), () => {
    ready = true;
    console.log(`listening on ws://${args.host}:${httpServer.address().port}`);
  });

  const stop = () => {
    io.close(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(`socketio server: ${err.message}`);
  process.exit(1);
});
