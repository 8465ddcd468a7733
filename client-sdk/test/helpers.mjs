// A live paystream for the SDK's tests: `paystream dev` as a subprocess (embedded Postgres
// in a fresh folder unless DATABASE_URL is set), plus Stripe-signed webhooks.

import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, mkdirSync, statSync } from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const PYTHON = process.env.PAYSTREAM_PYTHON ?? join(ROOT, ".venv", "bin", "python");
export const ARTIFACTS = join(ROOT, "client-sdk", "test-artifacts");
mkdirSync(ARTIFACTS, { recursive: true });

export function freePort() {
  return new Promise((res) => {
    const srv = createServer().listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => res(port));
    });
  });
}

async function until(check, what, ms = 30000) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await check().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50)); // another process's start-up: nothing to await
  }
}

/** Start the local Stripe `paystream dev` runs (localstripe with prices, default_incomplete
 *  subscriptions and Checkout Sessions: paystream.dev.emulator) on its own, so it outlives
 *  paystream restarts. `checkoutPage`: the URL prefix its sessions' hosted page is at. */
export async function startLocalStripe({ checkoutPage } = {}) {
  const port = await freePort();
  const env = { ...process.env, ...(checkoutPage ? { PAYSTREAM_EMULATOR_CHECKOUT_PAGE: checkoutPage } : {}) };
  const proc = spawn(PYTHON, ["-m", "paystream.dev.localstripe", "--port", String(port), "--extensions", "paystream.dev.emulator"], { stdio: "ignore", env });
  const url = `http://127.0.0.1:${port}`;
  await until(async () => (await fetch(`${url}/v1/customers`, { headers: { Authorization: "Bearer sk_test_x" } })).ok, "localstripe");
  return {
    url,
    async registerWebhook(target, secret) {
      const res = await fetch(`${url}/_config/webhooks/paystream`, { method: "POST", body: new URLSearchParams({ url: target, secret }) });
      if (!res.ok) throw new Error(`localstripe webhook registration: ${res.status}`);
    },
    /** A form-encoded call to its API, as stripe-python or Stripe.js would make. */
    async api(path, form) {
      const res = await fetch(`${url}${path}`, {
        method: form ? "POST" : "GET", body: form && new URLSearchParams(form),
        headers: { Authorization: "Bearer sk_test_x" },
      });
      return { status: res.status, body: await res.json() };
    },
    stop: () => proc.kill("SIGTERM"),
  };
}

/** `paystream dev` on a port and data folder; start() again after stop() keeps both. */
export class Paystream {
  constructor({ port, dataDir, env = {} }) {
    this.port = port;
    this.url = `http://127.0.0.1:${port}`;
    this.dataDir = dataDir;
    this.env = env;
  }
  static async create(env = {}) {
    return new Paystream({ port: await freePort(), dataDir: mkdtempSync(join(tmpdir(), "paystream-sdk-")), env });
  }
  async start() {
    this.proc = spawn(PYTHON, ["-m", "paystream", "dev", "--port", String(this.port)], {
      env: { ...process.env, PAYSTREAM_DATA_DIR: this.dataDir, PAYSTREAM_SSE_PING: "1", ...this.env },
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.exited = new Promise((r) => this.proc.on("exit", r));
    await until(async () => (await fetch(`${this.url}/readyz`)).ok, "paystream dev");
    this.secrets = JSON.parse(readFileSync(join(this.dataDir, "dev-secrets.json"), "utf8"));
    return this;
  }
  async stop() {
    this.proc.kill("SIGTERM");
    await this.exited;
  }
  /** A stream token for `ids`; a last argument `{ ttl }` sets its lifetime in seconds
   *  (default 600; negative: already expired). */
  token(...ids) {
    const { ttl = 600 } = typeof ids.at(-1) === "object" ? ids.pop() : {};
    const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
    const head = b64({ alg: "HS256", typ: "JWT" });
    const now = Date.now() / 1000;
    const body = b64({ iat: Math.floor(now), exp: Math.round(now + ttl), txn: ids });
    const sig = createHmac("sha256", this.secrets.PAYSTREAM_TOKEN_SECRET).update(`${head}.${body}`).digest("base64url");
    return `${head}.${body}.${sig}`;
  }
  /** Sign and post a Stripe event about PaymentIntent `pi`, as Stripe does. */
  async send(type, pi, { status, created, lastError, metadata = {} } = {}) {
    return this.sendObject(type, { id: pi, object: "payment_intent", amount: 1500, currency: "usd", status, metadata,
      last_payment_error: lastError ?? null, customer: null }, { created });
  }
  /** Sign and post a Stripe event of `type` about `object` (its JSON), as Stripe does. */
  async sendObject(type, object, { created } = {}) {
    const event = {
      id: `evt_${randomBytes(12).toString("hex")}`, object: "event", api_version: "2025-03-31.basil",
      created: created ?? Math.floor(Date.now() / 1000), type, livemode: false, data: { object },
    };
    const body = JSON.stringify(event);
    const t = Math.floor(Date.now() / 1000);
    const v1 = createHmac("sha256", this.secrets.STRIPE_WEBHOOK_SECRET.split(",")[0]).update(`${t}.${body}`).digest("hex");
    const res = await fetch(`${this.url}/v1/stripe/webhook`, {
      method: "POST", body, headers: { "Content-Type": "application/json", "Stripe-Signature": `t=${t},v1=${v1}` },
    });
    if (res.status !== 200) throw new Error(`webhook answered ${res.status}: ${await res.text()}`);
    return res.json();
  }
  async metrics() {
    return (await fetch(`${this.url}/metrics`)).text();
  }
  /** The merchant backend's call to paystream's API (the API key). */
  async backend(method, path, body) {
    const res = await fetch(`${this.url}${path}`, {
      method, body: body && JSON.stringify(body),
      headers: { Authorization: `Bearer ${this.secrets.PAYSTREAM_API_KEY}`, "Content-Type": "application/json" },
    });
    return { status: res.status, body: await res.json() };
  }
  /** Open streams the server counts for `transport` (sse, ws, long_poll). */
  async connections(transport = "sse") {
    const m = new RegExp(`paystream_connections\\{transport="${transport}"\\} ([\\d.]+)`).exec(await this.metrics());
    return m ? Number(m[1]) : 0;
  }
}

export const newPi = () => `pi_${randomBytes(12).toString("hex")}`;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Poll `check` (another process's state: nothing to await) until it is truthy, at most `ms`. */
export async function eventually(check, what, ms = 15000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check().catch(() => undefined);
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(100);
  }
}

/** A TCP proxy to `target` (a URL) that logs each connection's request line and can cut
 *  every connection it carries, as a network drop does. */
export async function tcpProxy(target) {
  const { hostname, port } = new URL(target);
  const carried = new Set();
  const requests = [];
  const server = createServer((client) => {
    const upstream = connect(Number(port), hostname);
    client.on("data", (chunk) => {
      const line = chunk.toString("latin1").split("\r\n", 1)[0];
      if (/^[A-Z]+ \S+ HTTP\/1\.1$/.test(line)) requests.push(line);
    });
    client.pipe(upstream);
    upstream.pipe(client);
    const pair = { client, upstream };
    carried.add(pair);
    const drop = () => { carried.delete(pair); client.destroy(); upstream.destroy(); };
    client.on("error", drop).on("close", drop);
    upstream.on("error", drop).on("close", drop);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    requests,
    cut() { for (const { client, upstream } of [...carried]) { client.destroy(); upstream.destroy(); } },
    close() { this.cut(); server.close(); },
  };
}

const TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript",
  ".css": "text/css", ".svg": "image/svg+xml", ".json": "application/json" };

/** Serve files over HTTP on `host` (a free port): `files` maps a path to a file or its text;
 *  with `dir`, any file under it. With `proxy` (a URL), every other request goes there,
 *  streamed both ways, so a page can reach paystream on its own origin. */
export async function servePage({ host = "127.0.0.1", files = {}, dir, proxy } = {}) {
  const { createServer: createHttp, request } = await import("node:http");
  const { extname } = await import("node:path");
  const target = proxy && new URL(proxy);
  const server = createHttp((req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    let body = files[path];
    if (body === undefined && dir && !path.includes("..")) {
      const file = join(dir, path === "/" ? "index.html" : path);
      if (existsSync(file) && statSync(file).isFile()) body = readFileSync(file);
    }
    if (body !== undefined) {
      res.writeHead(200, { "Content-Type": TYPES[extname(path)] ?? "text/html; charset=utf-8", "Cache-Control": "no-store" });
      res.end(body);
      return;
    }
    if (!target) {
      res.writeHead(404).end();
      return;
    }
    const upstream = request({ host: target.hostname, port: target.port, path: req.url, method: req.method,
      headers: req.headers }, (up) => { res.writeHead(up.statusCode, up.headers); up.pipe(res); });
    upstream.on("error", () => res.destroy());
    res.on("close", () => upstream.destroy()); // the page aborted: so does the proxied stream
    req.pipe(upstream);
  });
  await new Promise((r) => server.listen(0, host, r));
  return {
    origin: `http://${host}:${server.address().port}`,
    close: () => { server.closeAllConnections(); server.close(); },
  };
}
