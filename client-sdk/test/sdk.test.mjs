// The SDK against a live server over each transport.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { PaystreamError, waitFor, watch } from "../dist/index.js";
import { newPi, Paystream } from "./helpers.mjs";

let ps;
before(async () => { ps = await (await Paystream.create()).start(); });
after(async () => { await ps?.stop(); });

/** Collect a watch's updates; resolves when `done(updates)` says so. */
function collect(id, options, done) {
  const updates = [];
  let stop;
  const finished = new Promise((resolve, reject) => {
    stop = watch(id, {
      baseUrl: ps.url, ...options,
      onUpdate(tx) { updates.push(tx); if (done(updates)) resolve(updates); },
      onError: reject,
    });
  });
  return { updates, finished, stop: () => stop() };
}

for (const transport of ["sse", "ws", "poll"]) {
  describe(`transport ${transport}`, () => {
    test("every update once, in seq order, ending at the final status", async () => {
      const pi = newPi();
      await ps.send("payment_intent.processing", pi, { status: "processing" });
      let snapshotSeen;
      const ready = new Promise((r) => { snapshotSeen = r; });
      const w = collect(pi, { token: ps.token(pi), transport }, (u) => { snapshotSeen(); return u.at(-1).status === "succeeded"; });
      await ready;
      await ps.send("payment_intent.succeeded", pi, { status: "succeeded" });
      await ps.send("payment_intent.succeeded", pi, { status: "succeeded" }); // a repeat delivery
      const updates = await w.finished;
      w.stop();
      assert.deepEqual(updates.map((u) => [u.seq, u.status]), [[1, "processing"], [2, "succeeded"]]);
    });
  });
}

test("several transactions share one WebSocket", async () => {
  const [a, b] = [newPi(), newPi()];
  await ps.send("payment_intent.processing", a, { status: "processing" });
  await ps.send("payment_intent.processing", b, { status: "processing" });
  const token = ps.token(a, b);
  const done = (u) => u.at(-1).status === "succeeded";
  const wa = collect(a, { token, transport: "ws" }, done);
  const wb = collect(b, { token, transport: "ws" }, done);
  while (wa.updates.length === 0 || wb.updates.length === 0) await new Promise((r) => setTimeout(r, 20));
  assert.match(await ps.metrics(), /paystream_connections\{transport="ws"\} 1\.0/);
  await ps.send("payment_intent.succeeded", a, { status: "succeeded" });
  await ps.send("payment_intent.succeeded", b, { status: "succeeded" });
  assert.equal((await wa.finished).at(-1).status, "succeeded");
  assert.equal((await wb.finished).at(-1).status, "succeeded");
});

test("waitFor resolves with the transaction", async () => {
  const pi = newPi();
  await ps.send("payment_intent.requires_action", pi, { status: "requires_action" });
  const waiting = waitFor(pi, { baseUrl: ps.url, token: ps.token(pi), timeoutMs: 10000, onUpdate: () => {} });
  await ps.send("payment_intent.succeeded", pi, { status: "succeeded" });
  const tx = await waiting;
  assert.equal(tx.status, "succeeded");
  assert.equal(tx.stripe_id, pi);
});

test("waitFor rejects a decline pushed while waiting, with last_error", async () => {
  const pi = newPi();
  const t = Math.floor(Date.now() / 1000) - 10;
  await ps.send("payment_intent.requires_action", pi, { status: "requires_action", created: t });
  let seen;
  const first = new Promise((r) => { seen = r; });
  const waiting = waitFor(pi, { baseUrl: ps.url, token: ps.token(pi), timeoutMs: 10000, onUpdate: () => seen() });
  await first;
  // The rejection can land before send() returns: watch for it first.
  const rejected = assert.rejects(waiting, (err) => err instanceof PaystreamError && err.code === "declined"
    && err.transaction.last_error.code === "card_declined");
  await ps.send("payment_intent.payment_failed", pi, { status: "requires_payment_method", created: t + 1,
    lastError: { code: "card_declined", message: "Your card was declined." } });
  await rejected;
});

test("waitFor rejects on a cancel, a timeout, a refused or a foreign token", async () => {
  const pi = newPi();
  await ps.send("payment_intent.processing", pi, { status: "processing" });
  const opts = { baseUrl: ps.url, token: ps.token(pi) };
  await assert.rejects(waitFor(pi, { ...opts, timeoutMs: 300 }), { code: "timeout" });
  await assert.rejects(waitFor(pi, { ...opts, token: "forged.token.here" }), { code: "unauthorized" });
  await assert.rejects(waitFor(pi, { ...opts, token: ps.token("pi_other") }), { code: "forbidden" });
  const ac = new AbortController();
  const aborted = waitFor(pi, { ...opts, signal: ac.signal });
  ac.abort();
  await assert.rejects(aborted, { code: "aborted" });
  const canceled = waitFor(pi, { ...opts, timeoutMs: 10000 });
  await ps.send("payment_intent.canceled", pi, { status: "canceled" });
  await assert.rejects(canceled, { code: "canceled" });
});

test("a server restart: the stream reconnects, resumes from its seq and misses nothing", async () => {
  const pi = newPi();
  const t = Math.floor(Date.now() / 1000) - 10;
  await ps.send("payment_intent.created", pi, { status: "requires_payment_method", created: t });
  const w = collect(pi, { token: ps.token(pi), transport: "sse" }, (u) => u.at(-1).status === "succeeded");
  while (w.updates.length === 0) await new Promise((r) => setTimeout(r, 20));
  await ps.stop();
  await ps.start();
  await ps.send("payment_intent.requires_action", pi, { status: "requires_action", created: t + 1 });
  await ps.send("payment_intent.succeeded", pi, { status: "succeeded", created: t + 2 });
  const updates = await w.finished;
  w.stop();
  assert.deepEqual(updates.map((u) => u.seq), [1, 2, 3]);
});

test("SSE blocked by a proxy: the SDK falls back to the next transport by itself", async () => {
  const { createServer, request } = await import("node:http");
  const { connect } = await import("node:net");
  const target = new URL(ps.url);
  // A proxy that turns event streams into an HTML error page (as a captive or buffering
  // proxy does) and passes everything else through, WebSocket upgrades included.
  const proxy = createServer((req, res) => {
    if (req.url.includes("/events")) {
      res.writeHead(200, { "Content-Type": "text/html" }).end("<h1>blocked</h1>");
      return;
    }
    const upstream = request({ host: target.hostname, port: target.port, path: req.url, method: req.method,
      headers: req.headers }, (up) => { res.writeHead(up.statusCode, up.headers); up.pipe(res); });
    req.pipe(upstream);
  });
  proxy.on("upgrade", (req, socket, head) => {
    const up = connect(Number(target.port), target.hostname, () => {
      up.write(`${req.method} ${req.url} HTTP/1.1\r\n${Object.entries(req.headers).map(([k, v]) => `${k}: ${v}`).join("\r\n")}\r\n\r\n`);
      up.write(head);
      up.pipe(socket);
      socket.pipe(up);
    });
  });
  await new Promise((r) => proxy.listen(0, "127.0.0.1", r));
  const baseUrl = `http://127.0.0.1:${proxy.address().port}`;
  try {
    const pi = newPi();
    await ps.send("payment_intent.processing", pi, { status: "processing" });
    const used = [];
    const updates = [];
    const done = new Promise((resolve, reject) => {
      watch(pi, { baseUrl, token: ps.token(pi), onTransport: (t) => used.push(t), onError: reject,
        onUpdate(tx) { updates.push(tx); if (tx.status === "succeeded") resolve(); } });
    });
    while (updates.length === 0) await new Promise((r) => setTimeout(r, 20));
    await ps.send("payment_intent.succeeded", pi, { status: "succeeded" });
    await done;
    assert.deepEqual(used, ["ws"]);
    assert.deepEqual(updates.map((u) => u.seq), [1, 2]);
  } finally {
    proxy.closeAllConnections?.();
    proxy.close();
  }
});

test("a tab that comes back into view re-reads the status at once, though its stream went silent", async () => {
  const { createServer, connect } = await import("node:net");
  const target = new URL(ps.url);
  // A TCP proxy that can freeze the connections it already carries (as a suspended tab's
  // socket goes quiet without closing) while new connections still pass.
  const carried = [];
  const requests = [];
  const proxy = createServer((client) => {
    const upstream = connect(Number(target.port), target.hostname);
    client.once("data", (chunk) => requests.push(chunk.toString("latin1").split("\r\n", 1)[0]));
    client.pipe(upstream);
    upstream.pipe(client);
    carried.push(upstream);
    client.on("error", () => upstream.destroy());
    upstream.on("error", () => client.destroy());
  });
  await new Promise((r) => proxy.listen(0, "127.0.0.1", r));
  const baseUrl = `http://127.0.0.1:${proxy.address().port}`;
  // The SDK listens for visibilitychange on `document` when there is one.
  const doc = Object.assign(new EventTarget(), { visibilityState: "visible" });
  globalThis.document = doc;
  let stop = () => {};
  try {
    const pi = newPi();
    await ps.send("payment_intent.processing", pi, { status: "processing" });
    const updates = [];
    let snapshotSeen;
    const ready = new Promise((r) => { snapshotSeen = r; });
    const done = new Promise((resolve, reject) => {
      stop = watch(pi, { baseUrl, token: ps.token(pi), transport: "sse", onError: reject,
        onUpdate(tx) { updates.push(tx); snapshotSeen(); if (tx.status === "succeeded") resolve(); } });
    });
    await ready;
    doc.visibilityState = "hidden";
    doc.dispatchEvent(new Event("visibilitychange"));
    for (const up of carried) up.pause(); // the stream goes silent, and stays open
    await ps.send("payment_intent.succeeded", pi, { status: "succeeded" });
    assert.deepEqual(updates.map((u) => u.status), ["processing"]); // held in the frozen socket

    doc.visibilityState = "visible";
    doc.dispatchEvent(new Event("visibilitychange"));
    let timer;
    await Promise.race([done, new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error("no re-read on becoming visible")), 10000);
    })]).finally(() => clearTimeout(timer));
    assert.deepEqual(updates.map((u) => [u.seq, u.status]), [[1, "processing"], [2, "succeeded"]]);
    assert.ok(requests.some((line) => line.startsWith(`GET /v1/transactions/${pi}?`)),
      `the re-read went through: ${JSON.stringify(requests)}`);
  } finally {
    stop();
    delete globalThis.document;
    for (const up of carried) up.destroy();
    proxy.close();
  }
});
