// Cross-origin in headless Chromium: a page on another origin (its own little HTTP server)
// loads the SDK bundle and watches a transaction on paystream over each transport. Its
// origin listed in PAYSTREAM_ALLOWED_ORIGINS: every push arrives. Not listed: nothing
// arrives, and each watch ends with an error instead of retrying for ever.

import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

import { freePort, newPi, Paystream, servePage } from "./helpers.mjs";

const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"];
const skip = !existsSync(CHROMIUM) && !process.env.CI ? `no Chromium at ${CHROMIUM} (apt-get install chromium)` : false;
const BUNDLE = join(dirname(fileURLToPath(import.meta.url)), "..", "dist", "paystream.min.js");
const TRANSPORTS = ["sse", "ws", "poll"];

// The page: window.watchAll() starts one watch per transport and records what each gets.
const PAGE = `<!doctype html><meta charset="utf-8"><title>cross-origin</title>
<pre id="log"></pre>
<script type="module">
import { watch } from "/paystream.min.js";
window.results = {};
window.watchAll = (baseUrl, id, token) => {
  for (const transport of ${JSON.stringify(TRANSPORTS)}) {
    const r = (window.results[transport] = { updates: [], error: null });
    const started = Date.now();
    watch(id, { baseUrl, token, transport,
      onUpdate: (tx) => { r.updates.push([tx.seq, tx.status]); show(); },
      onError: (err) => { r.error = err.code; r.ms = Date.now() - started; show(); } });
  }
};
const show = () => { document.getElementById("log").textContent = JSON.stringify(window.results, null, 1); };
</script>`;

let browser, ps, allowed, other;

before(async () => {
  if (skip) return;
  const files = { "/": PAGE, "/paystream.min.js": readFileSync(BUNDLE) };
  // Listed: a page on 127.0.0.1. Not listed: one on 127.0.0.2 (also this machine, but not
  // the localhost origins that `paystream dev` may allow on its own).
  allowed = await servePage({ host: "127.0.0.1", files });
  other = await servePage({ host: "127.0.0.2", files });
  ps = await (await Paystream.create({ PAYSTREAM_ALLOWED_ORIGINS: `${allowed.origin},http://127.0.0.1:${await freePort()}` })).start();
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS });
});
after(async () => {
  await browser?.close();
  allowed?.close();
  other?.close();
  await ps?.stop();
});

async function openPage(site, pi) {
  const page = await browser.newPage();
  await page.goto(site.origin);
  await page.evaluate(([base, id, token]) => window.watchAll(base, id, token), [ps.url, pi, ps.token(pi)]);
  return page;
}

describe("cross-origin", () => {
  test("a listed origin gets every push over SSE, WebSocket and long-poll", { skip }, async () => {
    const pi = newPi();
    await ps.send("payment_intent.processing", pi, { status: "processing" });
    const page = await openPage(allowed, pi);
    await page.waitForFunction((ts) => ts.every((t) => window.results[t].updates.length > 0 || window.results[t].error),
      TRANSPORTS, { timeout: 20000 });
    await ps.send("payment_intent.succeeded", pi, { status: "succeeded" });
    await page.waitForFunction((ts) => ts.every((t) => window.results[t].updates.length > 1 || window.results[t].error),
      TRANSPORTS, { timeout: 20000 });
    const results = await page.evaluate(() => window.results);
    for (const t of TRANSPORTS) {
      assert.deepEqual(results[t], { updates: [[1, "processing"], [2, "succeeded"]], error: null }, t);
    }
    await page.close();
  });

  test("an origin not listed gets no push over any transport, and each watch ends with an error", { skip }, async () => {
    const pi = newPi();
    await ps.send("payment_intent.processing", pi, { status: "processing" });
    const page = await openPage(other, pi);
    await ps.send("payment_intent.succeeded", pi, { status: "succeeded" });
    await page.waitForFunction((ts) => ts.every((t) => window.results[t].error), TRANSPORTS, { timeout: 30000 });
    const results = await page.evaluate(() => window.results);
    for (const t of TRANSPORTS) {
      assert.deepEqual(results[t].updates, [], `${t}: nothing arrives`);
      assert.equal(results[t].error, "transport", t);
    }
    await page.close();
  });
});
