// The published types (dist/*.d.ts) compiled against test/types/kinds.ts: each kind's
// statuses and fields, narrowed on `kind`, and what they refuse.

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");

test("the types name each kind and its statuses: a page narrows on kind, and a wrong status does not compile", () => {
  const tsc = join(ROOT, "node_modules", "typescript", "bin", "tsc");
  const run = spawnSync(process.execPath, [tsc, "--noEmit", "--strict", "--target", "ES2022", "--module", "ES2022",
    "--moduleResolution", "Bundler", "--skipLibCheck", "--lib", "ES2022,DOM", "--types", "react",
    join(ROOT, "test", "types", "kinds.ts")], { cwd: ROOT, encoding: "utf8" });
  assert.equal(run.status, 0, run.stdout + run.stderr);
});
