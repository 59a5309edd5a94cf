#!/usr/bin/env bash
# Builds the Pulumi CLI at tools/pulumi/VERSION from Go modules (the wrapper module next to this
# file, with its checked-in go.sum) into .tools/bin/pulumi. Builds are cached per version and
# go.sum under ${COGNIVERN_TOOLS_CACHE:-$HOME/.cache/cognivern-tools}, so a second run (or a later
# CI run on the same machine) only copies the binary. Usage: tools/pulumi/build.sh [BIN_DIR]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin_dir="${1:-$repo/.tools/bin}"
version="$(tr -d '[:space:]' <"$here/VERSION")"
cache_root="${COGNIVERN_TOOLS_CACHE:-$HOME/.cache/cognivern-tools}"

echo "pulumi-cli: Pulumi CLI v$version from Go modules (a cold build took 8.5 min on this 2-core machine kind; cached afterwards)"

if ! [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
    echo "pulumi-cli: error: tools/pulumi/VERSION must hold one version such as 3.274.1, got '$version'" >&2
    exit 1
fi
if ! grep -qxF "require github.com/pulumi/pulumi/pkg/v3 v$version" "$here/go.mod"; then
    echo "pulumi-cli: error: tools/pulumi/go.mod does not require github.com/pulumi/pulumi/pkg/v3 v$version (VERSION says $version): cd tools/pulumi && go get github.com/pulumi/pulumi/pkg/v3@v$version && go mod tidy" >&2
    exit 1
fi
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
    PATH="/usr/local/go/bin:$PATH"  # the official tarball's place; a non-interactive shell may not have it on PATH
fi
if ! command -v go >/dev/null 2>&1; then
    echo "pulumi-cli: error: Go is not installed (need go >= $(sed -n 's/^go //p' "$here/go.mod")); install it, then run make pulumi-cli again" >&2
    exit 1
fi

key="$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -c1-16)"  # a changed build recipe rebuilds
cached="$cache_root/$version/$key/pulumi"
if [ -x "$cached" ]; then
    echo "pulumi-cli: cached build $cached"
else
    echo "pulumi-cli: downloading modules (GOPROXY=$(go env GOPROXY))"
    cd "$here"
    if ! download_log="$(go mod download 2>&1)"; then
        echo "pulumi-cli: error: the Go module proxy did not serve the modules in tools/pulumi/go.sum: $(printf '%s\n' "$download_log" | grep -m1 -i 'error\|forbidden\|not available\|dial' || printf '%s\n' "$download_log" | tail -n1)" >&2
        exit 1
    fi
    mkdir -p "$cache_root/$version/$key"
    work="$(mktemp -d "$cache_root/$version/$key/build.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    started=$SECONDS
    echo "pulumi-cli: compiling (go build -v; a progress line every 30 s)"
    nice -n 10 go build -v -trimpath -buildvcs=false \
        -ldflags "-s -w -X github.com/pulumi/pulumi/sdk/v3/go/common/version.Version=v$version" \
        -o "$work/pulumi" github.com/pulumi/pulumi/pkg/v3/cmd/pulumi 2>"$work/build.log" &
    build=$!
    while kill -0 "$build" 2>/dev/null; do
        for _ in $(seq 30); do
            kill -0 "$build" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$build" 2>/dev/null; then
            echo "pulumi-cli: $(grep -cv '^#' "$work/build.log" || true) packages compiled, $((SECONDS - started)) s"
        fi
    done
    if ! wait "$build"; then
        echo "pulumi-cli: error: go build failed: $(grep -m1 -E '\.go:[0-9]+|^go: ' "$work/build.log" || tail -n1 "$work/build.log")" >&2
        exit 1
    fi
    mv "$work/pulumi" "$cached"
    echo "pulumi-cli: built in $((SECONDS - started)) s -> $cached"
fi

mkdir -p "$bin_dir"
if ! cmp -s "$cached" "$bin_dir/pulumi"; then
    install -m 0755 "$cached" "$bin_dir/pulumi"
fi
echo "pulumi-cli: $bin_dir/pulumi ($("$bin_dir/pulumi" version))"
