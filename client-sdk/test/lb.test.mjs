// Behind a load balancer (issue 13): SDK clients in Node (SSE, WebSocket, long-poll) and a page
// in headless Chromium watch through a real HAProxy running docs/haproxy.cfg (the README's
// configuration) in front of three `paystream serve` nodes on one database. The node holding
// every stream is SIGKILLed mid-stream, then the node holding most of them; webhooks keep
// coming meanwhile, through the balancer too. Every client reconnects through the balancer to
// a live node and resumes from its seq: every update once, in order, ending at succeeded.
//
// The cluster (database, nodes, HAProxy) is `python -m tests.balancer`, driven over its stdin.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

import { watch } from "../dist/index.js";
import { ARTIFACTS, newPi, Paystream, PYTHON, servePage } from "./helpers.mjs";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const BUNDLE = join(ROOT, "client-sdk", "dist", "paystream.min.js");
const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"];
const HAPROXY = ["/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy"].some(existsSync);

// CI installs HAProxy and Chromium and must run this; elsewhere it is skipped, saying why
// (without Chromium, the Node clients still run).
const skip = !HAPROXY && !process.env.CI ? "no haproxy (apt-get install haproxy)" : false;
const withBrowser = existsSync(CHROMIUM) || Boolean(process.env.CI);

// The page: window.start() watches one transaction (the SDK's default transport choice) and
// reports each update and each (re)connected transport to the test.
const PAGE = `<!doctype html><meta charset="utf-8"><title>behind a balancer</title>
<script type="module">
import { watch } from "/paystream.min.js";
window.start = (baseUrl, id, token) => watch(id, { baseUrl, token,
  onUpdate: (tx) => window.report({ seq: tx.seq, status: tx.status }),
  onTransport: (name) => window.report({ transport: name }),
  onError: (err) => window.report({ error: err.code }) });
</script>`;

/** `python -m tests.balancer`: one JSON line per command. */
class Cluster {
  static async start(env) {
    const c = new Cluster();
    c.proc = spawn(PYTHON, ["-m", "tests.balancer", "--start", "node1", "--log-dir", ARTIFACTS], {
      cwd: ROOT, env: { ...process.env, ...env }, stdio: ["pipe", "pipe", "inherit"],
    });
    c.exited = new Promise((r) => c.proc.on("exit", r));
    c.lines = createInterface({ input: c.proc.stdout })[Symbol.asyncIterator]();
    c.info = await c.answer();
    assert.ok(c.info.ready, JSON.stringify(c.info));
    // helpers' Paystream signs webhooks and mints tokens; pointed at the balancer.
    c.lb = new Paystream({ port: Number(new URL(c.info.lb).port) });
    c.lb.secrets = { PAYSTREAM_TOKEN_SECRET: c.info.token_secret, STRIPE_WEBHOOK_SECRET: c.info.webhook_secret };
    assert.equal(c.lb.url, c.info.lb);
    return c;
  }
  async answer() {
    const { value, done } = await this.lines.next();
    if (done) throw new Error("tests.balancer ended (see its log in client-sdk/test-artifacts)");
    const answer = JSON.parse(value);
    if (answer.error) throw new Error(`tests.balancer: ${answer.error}`);
    return answer;
  }
  async command(line) {
    this.proc.stdin.write(`${line}\n`);
    return this.answer();
  }
  /** Open streams on one node, by transport, from its /metrics. */
  async connections(name) {
    const text = await (await fetch(`${this.info.nodes[name].url}/metrics`)).text();
    const found = { sse: 0, ws: 0, long_poll: 0 };
    for (const [, transport, n] of text.matchAll(/^paystream_connections\{transport="(\w+)"\} (\S+)$/gm)) {
      found[transport] = Number(n);
    }
    return found;
  }
  async stop() {
    this.proc.stdin.end();
    await this.exited;
  }
}

/** Re-check another process's state (its /metrics) until `check` passes. */
async function eventually(check, what, ms = 20000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      return await check();
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${last?.message}`);
    await new Promise((r) => setTimeout(r, 50)); // another process: nothing to await
  }
}

let cluster, site, browser;

before(async () => {
  if (skip) return;
  if (!HAPROXY) assert.fail("HAProxy is needed at /usr/sbin/haproxy (apt-get install haproxy)");
  if (withBrowser) {
    site = await servePage({ files: { "/": PAGE, "/paystream.min.js": readFileSync(BUNDLE) } });
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS });
  }
  // Only node1 at first: every stream opens there. The page is on another origin.
  cluster = await Cluster.start({ PAYSTREAM_ALLOWED_ORIGINS: site?.origin ?? "" });
});
after(async () => {
  await browser?.close();
  site?.close();
  await cluster?.stop();
});

test("SIGKILL the node holding the streams, then another: every client resumes through HAProxy, nothing missed or twice",
  { skip, timeout: 180000 }, async () => {
    const lb = cluster.lb;
    const t0 = Math.floor(Date.now() / 1000) - 60;
    const steps = [
      ["payment_intent.created", "requires_payment_method"],
      ["payment_intent.requires_action", "requires_action"],
      ["payment_intent.processing", "processing"],
      ["payment_intent.amount_capturable_updated", "requires_capture"],
      ["payment_intent.succeeded", "succeeded"],
    ];
    const clients = [
      { name: "sse-1", transport: "sse" }, { name: "sse-2", transport: "sse" },
      { name: "ws-shared-1", transport: "ws", shared: true }, { name: "ws-shared-2", transport: "ws", shared: true },
      { name: "ws-own", transport: "ws" },
      { name: "poll-1", transport: "poll" }, { name: "poll-2", transport: "poll" },
      ...(browser ? [{ name: "chromium", browser: true }] : []),
    ];
    for (const c of clients) Object.assign(c, { pi: newPi(), updates: [], transports: [], errors: [] });
    const sharedToken = lb.token(...clients.filter((c) => c.shared).map((c) => c.pi));

    // Every update wakes whoever waits on a condition.
    let waiters = [];
    const changed = () => { for (const w of waiters) w(); };
    const until = (check, what, ms = 30000) => new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new Error(`timed out waiting for ${what}: ${JSON.stringify(clients.map((c) => [c.name, c.updates.map((u) => u[0])]))}`));
      }, ms);
      const probe = () => {
        if (!check()) return;
        clearTimeout(timer);
        waiters = waiters.filter((w) => w !== probe);
        resolve();
      };
      waiters.push(probe);
      probe();
    });
    const report = (c, r) => {
      if (r.error) c.errors.push(r.error);
      else if (r.transport) c.transports.push(r.transport);
      else c.updates.push([r.seq, r.status]);
      changed();
    };
    const deliver = (i) => Promise.all(clients.map((c) => lb.send(steps[i][0], c.pi, { status: steps[i][1], created: t0 + i })));
    const allHave = (seqs) => clients.every((c) => seqs.every((s) => c.updates.some(([seq]) => seq === s)));

    await deliver(0);
    const stops = [];
    let page;
    for (const c of clients) {
      if (c.browser) {
        page = await browser.newPage();
        await page.exposeFunction("report", (r) => report(c, r));
        await page.goto(site.origin);
        await page.evaluate(([base, id, token]) => { window.start(base, id, token); }, [lb.url, c.pi, lb.token(c.pi)]);
        continue;
      }
      stops.push(watch(c.pi, { baseUrl: lb.url, transport: c.transport, token: c.shared ? sharedToken : lb.token(c.pi),
        onUpdate: (tx) => report(c, tx), onTransport: (name) => report(c, { transport: name }),
        onError: (err) => report(c, { error: err.code }) }));
    }
    try {
      await until(() => allHave([1]), "every client's first update");
      await deliver(1);
      await until(() => allHave([1, 2]), "seq 2 everywhere");
      // All on node1, the only node up: SSE (Node's two and the page's), two sockets (one
      // shared by two watches), two long-polls (each asked again after seq 2).
      const browserSse = browser ? 1 : 0;
      await eventually(async () => assert.deepEqual(await cluster.connections("node1"),
        { sse: 2 + browserSse, ws: 2, long_poll: 2 }), "every stream on node1");
      await cluster.command("start node2");
      await cluster.command("start node3");

      // 1. SIGKILL node1, which holds every stream; a webhook at once, while they reconnect.
      let killedAt = Date.now();
      assert.equal((await cluster.command("kill node1")).exit, -9);
      await deliver(2);
      await until(() => allHave([1, 2, 3]), "every client back, with seq 3");
      const firstRecovery = Date.now() - killedAt;
      for (const c of clients) assert.ok(c.transports.length >= 2, `${c.name} reconnected: ${c.transports}`);
      const held = { node2: await cluster.connections("node2"), node3: await cluster.connections("node3") };
      const total = (n) => n.sse + n.ws + n.long_poll;

      // 2. SIGKILL whichever of node2 and node3 now holds more; the last two webhooks at once.
      const victim = total(held.node2) >= total(held.node3) ? "node2" : "node3";
      assert.ok(total(held[victim]) > 0, JSON.stringify(held));
      const before2 = Object.fromEntries(clients.map((c) => [c.name, c.transports.length]));
      killedAt = Date.now();
      assert.equal((await cluster.command(`kill ${victim}`)).exit, -9);
      await deliver(3);
      await deliver(4);
      await until(() => clients.every((c) => c.updates.at(-1)?.[1] === "succeeded"), "every client at succeeded");
      const secondRecovery = Date.now() - killedAt;
      const movedTwice = clients.filter((c) => c.transports.length > before2[c.name]).map((c) => c.name);

      console.log(`killed node1 holding all ${clients.length} clients' streams: all resumed with seq 3 in ${firstRecovery} ms; ` +
        `killed ${victim} holding ${JSON.stringify(held[victim])}: all at succeeded in ${secondRecovery} ms; ` +
        `reconnected again: ${movedTwice.join(", ")}; the page's transports: ${clients.find((c) => c.browser)?.transports}`);
      for (const c of clients) {
        assert.deepEqual(c.errors, [], c.name);
        const seqs = c.updates.map(([seq]) => seq);
        if (c.transport === "poll") {
          // Long-poll answers with the current state, not the log: it may skip a seq that came
          // and went while it reconnected, never repeat one or go back.
          assert.ok(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), `${c.name}: ${seqs}`);
          assert.deepEqual(seqs.slice(0, 3), [1, 2, 3], c.name);
          assert.deepEqual(c.updates.at(-1), [5, "succeeded"], c.name);
        } else {
          assert.deepEqual(c.updates, steps.map(([, status], i) => [i + 1, status]), c.name);
        }
      }
      assert.ok(movedTwice.length > 0, "the second kill moved some clients");
    } finally {
      for (const stop of stops) stop();
      await page?.close();
    }
  });
