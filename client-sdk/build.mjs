// Bundles src/ into dist/index.js (ESM, for npm) and dist/paystream.min.js (minified ESM,
// what the demo page loads). `--size` prints the minified+gzipped size.
import { build } from "esbuild";
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";

const common = { entryPoints: ["src/index.ts"], bundle: true, format: "esm", target: "es2020" };
await build({ ...common, outfile: "dist/index.js" });
await build({ ...common, outfile: "dist/paystream.min.js", minify: true });
const min = readFileSync("dist/paystream.min.js");
const gz = gzipSync(min, { level: 9 }).length;
if (process.argv.includes("--size")) {
  console.log(JSON.stringify({ minified_bytes: min.length, gzipped_bytes: gz }));
}
