// Bundles src/ into dist/index.js (ESM, for npm) and dist/paystream.min.js (minified ESM,
// what the demo page loads), and the React entry src/react.ts into dist/react.js, which
// imports the core from ./index.js and leaves `react` to the app. `--size` prints the
// minified+gzipped size of each: the core bundle, and the React entry on its own.
import { build } from "esbuild";
import { gzipSync } from "node:zlib";

const common = { bundle: true, format: "esm", target: "es2020" };
// The React entry's import of the core stays an import, so an app holds one copy of it.
const coreExternal = {
  name: "core-external",
  setup(b) {
    b.onResolve({ filter: /^\.\/index\.js$/ }, (args) => args.importer.endsWith("react.ts") ? { path: "./index.js", external: true } : undefined);
  },
};
const react = { ...common, entryPoints: ["src/react.ts"], external: ["react"], plugins: [coreExternal] };

await build({ ...common, entryPoints: ["src/index.ts"], outfile: "dist/index.js" });
const core = await build({ ...common, entryPoints: ["src/index.ts"], outfile: "dist/paystream.min.js", minify: true, write: false });
await build({ ...react, outfile: "dist/react.js" });
const reactMin = await build({ ...react, outfile: "dist/react.min.js", minify: true, write: false });

const { writeFileSync } = await import("node:fs");
writeFileSync("dist/paystream.min.js", core.outputFiles[0].contents);

const size = (result) => {
  const min = result.outputFiles[0].contents;
  return { minified_bytes: min.length, gzipped_bytes: gzipSync(min, { level: 9 }).length };
};
if (process.argv.includes("--size")) {
  console.log(JSON.stringify({ core: { file: "dist/paystream.min.js", ...size(core) },
    react: { file: "dist/react.js (minified; without the core and React)", ...size(reactMin) } }));
}
