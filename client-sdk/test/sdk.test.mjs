// The SDK against a live server over each transport.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { PaystreamError, waitFor, watch } from "../dist/index.js";
import { newPi, Paystream, sleep, tcpProxy } from "./helpers.mjs";

let ps;
before(async () => { ps = await (await Paystream.create()).start(); });
after(async () => { await ps?.stop(); });

/** Collect a watch's updates; `first` resolves at the first one, `finished` when
 *  `done(updates)` says so; both reject on the watch's error. */
function collect(id, options, done) {
  const updates = [];
  let stop, seen, failed;
  const first = new Promise((resolve, reject) => { seen = resolve; failed = reject; });
  const finished = new Promise((resolve, reject) => {
    stop = watch(id, {
      baseUrl: ps.url, ...options,
      onUpdate(tx) { updates.push(tx); seen(); if (done(updates)) resolve(updates); },
      onError(err) { failed(err); reject(err); },
    });
  });
  finished.catch(() => {}); // awaited later, or `first` reports the error
  return { updates, first, finished, stop: () => stop() };
}

for (const transport of ["sse", "ws", "poll"]) {
  describe(`transport ${transport}`, () => {
    test("every update once, in seq order, ending at the final status", async () => {
      const pi = newPi();
      await ps.send("payment_intent.processing", pi, { status: "processing" });
      const w = collect(pi, { token: ps.token(pi), transport }, (u) => u.at(-1).status === "succeeded");
      await w.first;
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
  await Promise.all([wa.first, wb.first]);
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
  // As for the decline: the rejection can land before send() returns.
  const canceled = assert.rejects(waitFor(pi, { ...opts, timeoutMs: 10000 }), { code: "canceled" });
  await ps.send("payment_intent.canceled", pi, { status: "canceled" });
  await canceled;
});

test("a server restart: the stream reconnects, resumes from its seq and misses nothing", async () => {
  const pi = newPi();
  const t = Math.floor(Date.now() / 1000) - 10;
  await ps.send("payment_intent.created", pi, { status: "requires_payment_method", created: t });
  const w = collect(pi, { token: ps.token(pi), transport: "sse" }, (u) => u.at(-1).status === "succeeded");
  await w.first;
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
    while (updates.length === 0) await Promise.race([done, sleep(20)]); // done rejects on an error
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
    assert.ok(requests.some((line) => line.startsWith(`GET /v1/transactions/${pi} `)),
      `the re-read went through: ${JSON.stringify(requests)}`);
    assert.ok(!requests.some((line) => line.includes("token=")), "no token in a URL");
  } finally {
    stop();
    delete globalThis.document;
    for (const up of carried) up.destroy();
    proxy.close();
  }
});

// --- stream tokens: never in a URL, renewed through getToken ---------------------------

const STEPS = [
  ["payment_intent.requires_action", "requires_action"],
  ["payment_intent.processing", "processing"],
  ["payment_intent.amount_capturable_updated", "requires_capture"],
  ["payment_intent.succeeded", "succeeded"],
];

for (const transport of ["sse", "ws", "poll"]) {
  test(`getToken over ${transport}: 2-second tokens renewed across several lifetimes and a drop, every update once, in order`, async () => {
    const proxy = await tcpProxy(ps.url);
    const pi = newPi();
    const t0 = Math.floor(Date.now() / 1000) - 30;
    await ps.send("payment_intent.created", pi, { status: "requires_payment_method", created: t0 });
    const minted = [];
    const getToken = async () => {
      minted.push(Date.now());
      return ps.token(pi, { ttl: 2 });
    };
    const w = collect(pi, { baseUrl: proxy.url, getToken, transport }, (u) => u.at(-1).status === "succeeded");
    try {
      await w.first;
      for (const [i, [type, status]] of STEPS.entries()) {
        await sleep(1500);
        // Half-way, after the first token has expired: every connection drops, and the
        // reconnect must carry a renewed token and resume from the last seq.
        if (i === 2) proxy.cut();
        await ps.send(type, pi, { status, created: t0 + i + 1 });
      }
      const updates = await w.finished;
      assert.deepEqual(updates.map((u) => [u.seq, u.status]), [[1, "requires_payment_method"],
        ...STEPS.map(([, status], i) => [i + 2, status])]);
      assert.ok(minted.length >= 4, `getToken called ${minted.length} times in ~6 s of 2-second tokens`);
      assert.ok(proxy.requests.length > 0);
      for (const line of proxy.requests) assert.doesNotMatch(line, /token=/, "no token in a URL");
      if (transport === "ws") {
        // Renewals went over the open socket: one socket before the drop, one after.
        assert.deepEqual(proxy.requests, ["GET /v1/ws HTTP/1.1", "GET /v1/ws HTTP/1.1"]);
      } else {
        assert.ok(proxy.requests.length >= 2, "reconnected after the drop");
      }
    } finally {
      w.stop();
      proxy.close();
    }
  });

  test(`getToken over ${transport}: a refused token is replaced once; a replacement refused too ends the watch`, async () => {
    const pi = newPi();
    await ps.send("payment_intent.processing", pi, { status: "processing" });
    // The first token has already expired: the server refuses it, the SDK asks again.
    const tokens = [ps.token(pi, { ttl: -5 })];
    let calls = 0;
    const tx = await waitFor(pi, { baseUrl: ps.url, transport, until: ["processing"], timeoutMs: 10000,
      getToken: async () => tokens[calls++] ?? ps.token(pi) });
    assert.equal(tx.status, "processing");
    assert.equal(calls, 2);

    // getToken keeps giving tokens the server refuses: unauthorized, not a loop.
    let refused = 0;
    await assert.rejects(waitFor(pi, { baseUrl: ps.url, transport, timeoutMs: 10000,
      getToken: async () => { refused += 1; return ps.token(pi, { ttl: -5 }); } }), { code: "unauthorized" });
    assert.equal(refused, 2);
  });
}

test("getToken that throws, or both token and getToken: errors, not hangs", async () => {
  const pi = newPi();
  await ps.send("payment_intent.processing", pi, { status: "processing" });
  const boom = new Error("backend down");
  await assert.rejects(waitFor(pi, { baseUrl: ps.url, getToken: async () => { throw boom; } }),
    (err) => err instanceof PaystreamError && err.code === "unauthorized" && err.cause === boom);
  await assert.rejects(waitFor(pi, { baseUrl: ps.url, getToken: async () => "" }), { code: "unauthorized" });
  await assert.rejects(waitFor(pi, { baseUrl: ps.url, token: ps.token(pi), getToken: async () => ps.token(pi) }), TypeError);
  await assert.rejects(waitFor(pi, { baseUrl: ps.url }), TypeError);
  assert.throws(() => watch(pi, { baseUrl: ps.url, onUpdate() {} }), TypeError);
});

test("watches given the same getToken share its renewals and one WebSocket", async () => {
  const [a, b] = [newPi(), newPi()];
  await ps.send("payment_intent.processing", a, { status: "processing" });
  await ps.send("payment_intent.processing", b, { status: "processing" });
  let calls = 0;
  const getToken = async () => { calls += 1; return ps.token(a, b, { ttl: 2 }); };
  const done = (u) => u.at(-1).status === "succeeded";
  const wa = collect(a, { getToken, transport: "ws" }, done);
  const wb = collect(b, { getToken, transport: "ws" }, done);
  await Promise.all([wa.first, wb.first]);
  await sleep(3000); // past the first token's exp: the socket was renewed, not closed
  assert.match(await ps.metrics(), /paystream_connections\{transport="ws"\} 1\.0/);
  assert.ok(calls >= 2 && calls <= 4, `one renewal per lifetime for both watches, not one each (${calls})`);
  await ps.send("payment_intent.succeeded", a, { status: "succeeded" });
  await ps.send("payment_intent.succeeded", b, { status: "succeeded" });
  assert.deepEqual((await wa.finished).map((u) => u.seq), [1, 2]);
  assert.deepEqual((await wb.finished).map((u) => u.seq), [1, 2]);
});

test("nothing answers: the watch ends with a transport error instead of retrying for ever", async () => {
  const { freePort } = await import("./helpers.mjs");
  const baseUrl = `http://127.0.0.1:${await freePort()}`;
  const started = Date.now();
  await assert.rejects(waitFor("pi_nobody", { baseUrl, token: "a.b.c" }), { code: "transport" });
  assert.ok(Date.now() - started < 20000);
});
