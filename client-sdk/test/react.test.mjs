// usePaymentStatus (@paystream/client/react) on a React 19 page built with vite, in
// headless Chromium. The page is served with paystream behind it on one origin (a small
// proxy), so it needs no CORS; what the server sees is read from its /metrics.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

import { ARTIFACTS, newPi, Paystream, servePage, sleep } from "./helpers.mjs";

const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"];
const skip = !existsSync(CHROMIUM) && !process.env.CI ? `no Chromium at ${CHROMIUM} (apt-get install chromium)` : false;
const HERE = dirname(fileURLToPath(import.meta.url));

let browser, ps, page, site, outDir;
const minted = [];

/** Build test/react-page with vite, resolving @paystream/client/react through this
 *  package's own "exports" (as an app that installed it would). */
async function buildPage() {
  const { build } = await import("vite");
  const { default: react } = await import("@vitejs/plugin-react");
  outDir = mkdtempSync(join(tmpdir(), "paystream-react-page-"));
  await build({
    root: join(HERE, "react-page"),
    configFile: false,
    logLevel: "warn",
    cacheDir: join(outDir, ".vite-cache"),
    plugins: [react()],
    resolve: {
      alias: [{ find: /^@paystream\/client\/react$/, replacement: fileURLToPath(import.meta.resolve("@paystream/client/react")) }],
    },
    build: { outDir: join(outDir, "site"), emptyOutDir: true },
  });
  return join(outDir, "site");
}

before(async () => {
  if (skip) return;
  const siteDir = await buildPage();
  ps = await (await Paystream.create()).start();
  site = await servePage({ dir: siteDir, proxy: ps.url });
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS });
  page = await browser.newPage();
  page.on("pageerror", (err) => console.error("page error:", err));
  await page.exposeFunction("mintToken", (id, ttl) => {
    minted.push(id);
    return ps.token(id, { ttl });
  });
  await page.goto(site.origin);
  await page.waitForSelector("#none");
});
after(async () => {
  await browser?.close();
  site?.close();
  await ps?.stop();
  if (outDir) rmSync(outDir, { recursive: true, force: true });
});

async function sseConnections() {
  const m = /paystream_connections\{transport="sse"\} ([\d.]+)/.exec(await ps.metrics());
  return m ? Number(m[1]) : 0;
}

async function untilConnections(n) {
  const deadline = Date.now() + 10000;
  while ((await sseConnections()) !== n) {
    if (Date.now() > deadline) throw new Error(`open SSE streams stayed at ${await sseConnections()}, not ${n}`);
    await sleep(100);
  }
}

const shown = () => page.$$eval("#statuses li", (lis) => lis.map((li) => [li.dataset.id, li.dataset.status]));

test("usePaymentStatus: each status once, in order, over renewed 2-second tokens; unmounting closes the stream", { skip }, async () => {
  const pi = newPi();
  const t0 = Math.floor(Date.now() / 1000) - 30;
  await ps.send("payment_intent.created", pi, { status: "requires_payment_method", created: t0 });
  await page.evaluate((id) => window.show({ id, renew: true, transport: "sse" }), pi);
  await page.waitForSelector("li[data-status=requires_payment_method]");
  await untilConnections(1);

  const steps = [["payment_intent.requires_action", "requires_action"], ["payment_intent.processing", "processing"],
    ["payment_intent.amount_capturable_updated", "requires_capture"]];
  for (const [i, [type, status]] of steps.entries()) {
    await sleep(1200); // over the three steps, more than one token lifetime passes
    await ps.send(type, pi, { status, created: t0 + i + 1 });
    await page.waitForSelector(`li[data-status=${status}]`);
  }
  const statuses = ["requires_payment_method", "requires_action", "processing", "requires_capture"];
  assert.deepEqual(await shown(), statuses.map((s) => [pi, s]), "each status once, in order");
  assert.deepEqual(await page.evaluate(() => window.updates), statuses.map((s, i) => [pi, i + 1, s]));
  assert.ok(minted.length > 1, `getToken was called ${minted.length} times`);
  await page.screenshot({ path: join(ARTIFACTS, "react-statuses.png") });

  await page.evaluate(() => { window.requests.push(["unmount"]); window.show(null); });
  await page.waitForSelector("#none");
  await untilConnections(0);
  // The stream open at unmount is aborted then. (With 2-second tokens the server may
  // have just ended it at expiry, the SDK between streams: then there is none to abort.)
  // Either way nothing opens after the unmount.
  const requests = await page.evaluate(() => window.requests);
  const stream = `/v1/transactions/${pi}/events`;
  const unmount = requests.findIndex(([what]) => what === "unmount");
  const lastOpen = requests.findLastIndex(([what]) => what === "open");
  assert.ok(lastOpen < unmount, `nothing opened after unmounting: ${JSON.stringify(requests.slice(unmount))}`);
  const ends = requests.slice(lastOpen + 1).map(([what, path]) => [what, path]);
  const closed = ends.some(([what], i) => what === "end" && lastOpen + 1 + i < unmount) ? "ended before" : "aborted at";
  if (closed === "aborted at") assert.deepEqual(ends.at(-1), ["abort", stream], JSON.stringify(requests.slice(lastOpen)));
  console.log(`# the last stream was ${closed} the unmount; requests: ${JSON.stringify(requests.map(([w]) => w))}`);
  assert.ok(requests.every(([, , search]) => !search?.includes("token")), "no token in a URL");

  // After unmounting nothing more reaches the page.
  await ps.send("payment_intent.succeeded", pi, { status: "succeeded", created: t0 + 9 });
  await sleep(500);
  assert.equal((await page.evaluate(() => window.updates)).length, 4);
  assert.equal((await page.evaluate(() => window.requests)).findLastIndex(([what]) => what === "open"), lastOpen,
    "nothing opened after unmounting");
});

test("usePaymentStatus: a new id closes the old stream before opening the new one", { skip }, async () => {
  const [a, b] = [newPi(), newPi()];
  await ps.send("payment_intent.processing", a, { status: "processing" });
  await ps.send("payment_intent.requires_action", b, { status: "requires_action" });
  await page.evaluate(([a, b, ta, tb]) => { window.tokens = { [a]: ta, [b]: tb }; window.requests.length = 0; },
    [a, b, ps.token(a), ps.token(b)]);
  await page.evaluate((id) => window.show({ id, transport: "sse" }), a);
  await page.waitForSelector(`li[data-id=${a}][data-status=processing]`);
  await untilConnections(1);

  await page.evaluate((id) => window.show({ id, transport: "sse" }), b);
  await page.waitForSelector(`li[data-id=${b}][data-status=requires_action]`);
  const requests = await page.evaluate(() => window.requests.map(([what, path]) => `${what} ${path}`));
  assert.deepEqual(requests, [`open /v1/transactions/${a}/events`, `abort /v1/transactions/${a}/events`,
    `open /v1/transactions/${b}/events`]);
  await untilConnections(1);

  // The old id's changes no longer show; the new one's do, and its stream ends at success.
  await ps.send("payment_intent.succeeded", a, { status: "succeeded" });
  await ps.send("payment_intent.succeeded", b, { status: "succeeded" });
  await page.waitForSelector(`li[data-id=${b}][data-status=succeeded]`);
  assert.deepEqual(await shown(), [[a, "processing"], [b, "requires_action"], [b, "succeeded"]]);
  assert.equal(await page.textContent("#current"), "succeeded");
  await untilConnections(0);
  await page.evaluate(() => window.show(null));
});

test("usePaymentStatus shows a subscription's status: active and past_due keep the stream, canceled ends it", { skip }, async () => {
  const sub = `sub_${randomBytes(12).toString("hex")}`;
  const t0 = Math.floor(Date.now() / 1000) - 60;
  const subscription = (status, seconds) => ps.sendObject(
    status === "canceled" ? "customer.subscription.deleted"
      : seconds === 0 ? "customer.subscription.created" : "customer.subscription.updated",
    { id: sub, object: "subscription", status, customer: "cus_react", currency: "usd", metadata: {},
      cancel_at_period_end: false, trial_end: null, latest_invoice: null,
      items: { object: "list", data: [{ price: { unit_amount: 2900, currency: "usd" }, quantity: 1,
        current_period_end: t0 + 30 * 86400 }] } },
    { created: t0 + seconds }); // a second apart: Stripe's time orders them, no tie to settle
  await subscription("incomplete", 0);
  await page.evaluate(([id, token]) => { window.tokens = { [id]: token }; }, [sub, ps.token(sub)]);
  await page.evaluate((id) => window.show({ id, transport: "sse" }), sub);
  await page.waitForSelector(`li[data-id=${sub}][data-status=incomplete]`);
  await untilConnections(1);
  const statuses = ["incomplete", "active", "past_due", "active"];
  for (const [i, status] of statuses.entries()) {
    if (i === 0) continue;
    await subscription(status, i);
    await page.waitForFunction((n) => document.querySelectorAll("#statuses li").length === n, i + 1);
  }
  assert.equal(await page.textContent("#current"), "active");
  await untilConnections(1); // through active and past_due the stream stays open
  await subscription("canceled", 9);
  await page.waitForSelector(`li[data-id=${sub}][data-status=canceled]`);
  assert.deepEqual(await shown(), [...statuses, "canceled"].map((s) => [sub, s]));
  await untilConnections(0); // canceled ends it
  assert.equal(await page.$("#error"), null, "ended without an error");
  await page.evaluate(() => window.show(null));
});
