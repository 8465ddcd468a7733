// What ships: the core bundle's size budget, and React kept out of it.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");

test("npm run size: the core stays under 5 KB min+gzip; the React entry is counted apart", () => {
  const out = execFileSync(process.execPath, ["build.mjs", "--size"], { cwd: ROOT, encoding: "utf8" });
  const sizes = JSON.parse(out.trim().split("\n").at(-1));
  assert.ok(sizes.core.gzipped_bytes < 5 * 1024, `core: ${sizes.core.gzipped_bytes} bytes gzipped`);
  assert.ok(sizes.react.gzipped_bytes < 1024, `react entry: ${sizes.react.gzipped_bytes} bytes gzipped`);
});

test("the core bundle holds no React; the React entry imports the core and react, bundling neither", () => {
  const core = readFileSync(join(ROOT, "dist", "paystream.min.js"), "utf8");
  assert.doesNotMatch(core, /react|useEffect/i);
  const entry = readFileSync(join(ROOT, "dist", "react.js"), "utf8");
  const imports = [...entry.matchAll(/^import .* from "([^"]+)";$/gm)].map((m) => m[1]).sort();
  assert.deepEqual(imports, ["./index.js", "react"]);
  const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8"));
  assert.deepEqual(pkg.exports["./react"], { types: "./dist/react.d.ts", import: "./dist/react.js" });
  assert.equal(pkg.peerDependenciesMeta.react.optional, true);
});
