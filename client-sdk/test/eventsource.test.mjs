// The browser's own EventSource, no SDK (issue 11): once it has seen a final status the
// server answers its reconnect with 204, and the HTML standard says EventSource then stops.
// Before, every reconnect got an empty 200 and Chromium reconnected each second.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { after, before, test } from "node:test";

import { chromium } from "playwright-core";

import { Paystream, newPi, servePage } from "./helpers.mjs";

const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"];
const skip = !existsSync(CHROMIUM) && !process.env.CI ? `no Chromium at ${CHROMIUM} (apt-get install chromium)` : false;

let browser, ps, page;

before(async () => {
  if (skip) return;
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS });
  ps = await (await Paystream.create()).start();
  page = await servePage({ files: { "/": "<!doctype html><title>native EventSource</title>" } });
});
after(async () => {
  await browser?.close();
  await ps?.stop();
  page?.close();
});

test("a native EventSource stops after the final status instead of reconnecting every second", { skip }, async () => {
  const pi = newPi();
  await ps.send("payment_intent.processing", pi, { status: "processing", created: Math.floor(Date.now() / 1000) - 5 });
  const tab = await browser.newPage();
  const requests = [];
  tab.on("request", (r) => { if (r.url().includes("/events?")) requests.push(r.url()); });
  await tab.goto(page.origin); // another origin: paystream dev allows any 127.0.0.1 port
  await tab.evaluate(({ url }) => {
    window.seen = [];
    window.states = [];
    const source = new EventSource(url);
    window.source = source;
    for (const name of ["snapshot", "status"]) {
      source.addEventListener(name, (e) => window.seen.push(JSON.parse(e.data).status));
    }
    source.onerror = () => window.states.push(source.readyState);
  }, { url: `${ps.url}/v1/transactions/${pi}/events?token=${ps.token(pi)}` });
  await tab.waitForFunction(() => window.seen.length === 1);
  await ps.send("payment_intent.succeeded", pi, { status: "succeeded" });
  // The server ends the stream after `succeeded`; EventSource reconnects once (retry: 1000)
  // with Last-Event-ID, gets 204, and closes for good (readyState 2).
  await tab.waitForFunction(() => window.source.readyState === 2, null, { timeout: 10000 });
  const settled = requests.length;
  await new Promise((r) => setTimeout(r, 3000)); // three reconnect intervals: none may come
  assert.deepEqual(await tab.evaluate(() => window.seen), ["processing", "succeeded"]);
  assert.equal(requests.length, settled, "EventSource must not reconnect after the 204");
  assert.equal(settled, 2, "the stream, then one reconnect answered 204");
  await tab.close();
});
