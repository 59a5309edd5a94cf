#!/usr/bin/env bash
# Builds what the real `pulumi up` of this project needs, into .tools/bin:
#   pulumi                         the CLI at tools/pulumi/VERSION, from Go modules (this wrapper module)
#   pulumi-resource-command        pulumi-command's provider, from its upstream source tarball
#   pulumi-language-python         the Python language host, from its upstream source tarball, compiled
#                                  inside this wrapper module (against the CLI's pkg/v3)
#   pulumi-language-python-exec,   the scripts the language host runs, copied from the same tarball
#   pulumi-resource-pulumi-python
# The Go module proxy here refuses the provider's and the language host's modules, so their sources
# come as tarballs (COGNIVERN_THIRD_PARTY, default ../shared/third_party beside the repo: a README,
# the tarballs and SHA256SUMS); each tarball is checked against SHA256SUMS before it is opened.
# On a user's machine none of this is needed: the official CLI release bundles the language host and
# `pulumi` installs pulumi-resource-command itself. This build exists for CI and development.
#
# Builds are cached under ${COGNIVERN_TOOLS_CACHE:-$HOME/.cache/cognivern-tools}, each keyed by what goes
# into it (go.mod/go.sum, the Go version, the tarball's checksum and the recipe's tag below: bump a tag
# when its recipe changes), so a second run only copies, and editing one recipe rebuilds only that one.
# Usage: tools/pulumi/build.sh [BIN_DIR]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin_dir="${1:-$repo/.tools/bin}"
version="$(tr -d '[:space:]' <"$here/VERSION")"
cache_root="${COGNIVERN_TOOLS_CACHE:-$HOME/.cache/cognivern-tools}"
third_party="${COGNIVERN_THIRD_PARTY:-$repo/../shared/third_party}"
readonly CLI_RECIPE=cli-1 COMMAND_RECIPE=command-1 LANGUAGE_RECIPE=language-1
say() { echo "pulumi-tools: $*"; }
die() { echo "pulumi-tools: error: $*" >&2; exit 1; }

if ! [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
    die "tools/pulumi/VERSION must hold one version such as 3.274.1, got '$version'"
fi
if ! grep -qxE "(require )?[[:space:]]*github.com/pulumi/pulumi/pkg/v3 v${version//./\\.}" "$here/go.mod"; then
    die "tools/pulumi/go.mod does not require github.com/pulumi/pulumi/pkg/v3 v$version (VERSION says $version): cd tools/pulumi && go get github.com/pulumi/pulumi/pkg/v3@v$version && go mod tidy"
fi
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
    PATH="/usr/local/go/bin:$PATH" # the official tarball's place; a non-interactive shell may not have it on PATH
fi
command -v go >/dev/null 2>&1 || die "Go is not installed (need go >= $(sed -n 's/^go //p' "$here/go.mod")); install it, then run make pulumi-tools again"
[ -f "$third_party/SHA256SUMS" ] ||
    die "$third_party/SHA256SUMS is missing: the sources of pulumi-resource-command and pulumi-language-python (their tarballs and SHA256SUMS) must be there, or COGNIVERN_THIRD_PARTY must name their folder"

# $1 = tarball name: its sha256 from SHA256SUMS after checking the file against it
verified_sha() {
    local name=$1 want have
    [ -f "$third_party/$name" ] || die "$third_party/$name is missing (SHA256SUMS lists the tarballs the build needs)"
    want=$(awk -v n="$name" '$2 == n || $2 == "*" n { print $1 }' "$third_party/SHA256SUMS")
    [[ "$want" =~ ^[0-9a-f]{64}$ ]] || die "$third_party/SHA256SUMS has no sha256 for $name"
    have=$(sha256sum "$third_party/$name" | cut -d' ' -f1)
    [ "$have" = "$want" ] || die "$third_party/$name has sha256 $have, SHA256SUMS says $want: not building from it"
    printf '%s' "$have"
}

# The provider must be the version the program's SDK asks for (requirements.txt pins pulumi-command); the
# language host is whichever release the tarball holds (its version is in the name).
COMMAND_VERSION=$(sed -n 's/^pulumi-command==\([0-9.]*\)$/\1/p' "$repo/requirements.txt")
[[ "$COMMAND_VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "requirements.txt pins no pulumi-command==X.Y.Z"
COMMAND_TARBALL="pulumi-command-v$COMMAND_VERSION-provider.tar.gz"
LANGUAGE_TARBALL=$(awk '$2 ~ /^\*?pulumi-language-python-v[0-9.]+\.tar\.gz$/ { sub(/^\*/, "", $2); print $2 }' "$third_party/SHA256SUMS")
[[ "$LANGUAGE_TARBALL" =~ ^pulumi-language-python-v([0-9]+\.[0-9]+\.[0-9]+)\.tar\.gz$ ]] ||
    die "$third_party/SHA256SUMS names no (or more than one) pulumi-language-python-vX.Y.Z.tar.gz"
LANGUAGE_HOST_VERSION=${BASH_REMATCH[1]}
command_sha=$(verified_sha "$COMMAND_TARBALL")
language_sha=$(verified_sha "$LANGUAGE_TARBALL")

# $1 = label, $2 = log file, then the go build command: runs it niced, a progress line every 30 s
go_build() {
    local label=$1 log=$2 started=$SECONDS build
    shift 2
    say "$label: compiling (a progress line every 30 s)"
    nice -n 10 "$@" 2>"$log" &
    build=$!
    while kill -0 "$build" 2>/dev/null; do
        for _ in $(seq 30); do
            kill -0 "$build" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$build" 2>/dev/null; then
            say "$label: $(grep -cv '^#' "$log" || true) packages compiled, $((SECONDS - started)) s"
        fi
    done
    wait "$build" || die "$label: go build failed: $(grep -m1 -E '\.go:[0-9]+|^go: |missing go.sum' "$log" || tail -n1 "$log")"
    say "$label: built in $((SECONDS - started)) s"
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
go_version=$(go env GOVERSION)
# $@ = the inputs of one build: the first 16 hex digits of their sha256
cache_key() { printf '%s\n' "$@" | sha256sum | cut -c1-16; }
module_sum=$(cat "$here/go.mod" "$here/go.sum" | sha256sum | cut -d' ' -f1)

# ---------------------------------------------------------------------------- the CLI
cli_cache="$cache_root/$version/$(cache_key "$CLI_RECIPE" "$go_version" "$module_sum")"
if [ -x "$cli_cache/pulumi" ]; then
    say "pulumi: cached build $cli_cache/pulumi"
else
    say "pulumi: CLI v$version from Go modules (a cold build took 8.5 min on this 2-core machine kind)"
    (cd "$here" && go mod download) >"$work/download.log" 2>&1 ||
        die "the Go module proxy did not serve the modules in tools/pulumi/go.sum: $(grep -m1 -i 'error\|forbidden\|not available\|dial' "$work/download.log" || tail -n1 "$work/download.log")"
    mkdir -p "$cli_cache"
    (cd "$here" && go_build pulumi "$work/cli.log" go build -v -trimpath -buildvcs=false \
        -ldflags "-s -w -X github.com/pulumi/pulumi/sdk/v3/go/common/version.Version=v$version" \
        -o "$work/pulumi" github.com/pulumi/pulumi/pkg/v3/cmd/pulumi)
    mv "$work/pulumi" "$cli_cache/pulumi"
fi

# ---------------------------------------------------------------------------- the command provider
# Built with the tarball's own go.mod/go.sum, as upstream's release does.
command_cache="$cache_root/pulumi-resource-command/$COMMAND_VERSION/$(cache_key "$COMMAND_RECIPE" "$go_version" "$command_sha")"
if [ -x "$command_cache/pulumi-resource-command" ]; then
    say "pulumi-resource-command: cached build $command_cache/pulumi-resource-command"
else
    mkdir -p "$work/command" "$command_cache"
    tar -xzf "$third_party/$COMMAND_TARBALL" -C "$work/command" --strip-components=1
    (cd "$work/command/provider" && go_build pulumi-resource-command "$work/command.log" go build -v -trimpath -buildvcs=false \
        -ldflags "-s -w -X github.com/pulumi/pulumi-command/provider/pkg/version.Version=$COMMAND_VERSION" \
        -o "$work/pulumi-resource-command" ./cmd/pulumi-resource-command)
    mv "$work/pulumi-resource-command" "$command_cache/pulumi-resource-command"
fi

# ---------------------------------------------------------------------------- the Python language host
# Upstream's go.mod replaces pkg/v3 and sdk/v3 with paths inside its repository, so main.go (one file,
# package main) is compiled as a package of this wrapper module instead: the same pkg/v3 and sdk/v3 as
# the CLI, resolved by the checked-in go.sum (tools.go imports what main.go imports, so it stays tidy).
language_cache="$cache_root/pulumi-language-python/$LANGUAGE_HOST_VERSION/$(cache_key "$LANGUAGE_RECIPE" "$go_version" "$language_sha" "$module_sum")"
if [ -x "$language_cache/pulumi-language-python" ]; then
    say "pulumi-language-python: cached build $language_cache/pulumi-language-python"
else
    mkdir -p "$work/language" "$work/module/cmd/pulumi-language-python" "$language_cache"
    tar -xzf "$third_party/$LANGUAGE_TARBALL" -C "$work/language" --strip-components=1
    cp "$here/go.mod" "$here/go.sum" "$work/module/"
    cp "$work/language/sdk/python/cmd/pulumi-language-python/main.go" "$work/module/cmd/pulumi-language-python/"
    (cd "$work/module" && go_build pulumi-language-python "$work/language.log" go build -v -trimpath -buildvcs=false \
        -ldflags "-s -w -X github.com/pulumi/pulumi/sdk/v3/go/common/version.Version=v$LANGUAGE_HOST_VERSION" \
        -o "$work/pulumi-language-python" ./cmd/pulumi-language-python)
    install -m 0755 "$work/language/sdk/python/cmd/pulumi-language-python-exec" "$work/language/sdk/python/dist/pulumi-resource-pulumi-python" "$language_cache/"
    mv "$work/pulumi-language-python" "$language_cache/pulumi-language-python"
fi

# ---------------------------------------------------------------------------- into BIN_DIR
mkdir -p "$bin_dir"
for built in "$cli_cache/pulumi" "$command_cache/pulumi-resource-command" "$language_cache/pulumi-language-python" \
    "$language_cache/pulumi-language-python-exec" "$language_cache/pulumi-resource-pulumi-python"; do
    if ! cmp -s "$built" "$bin_dir/$(basename "$built")"; then
        install -m 0755 "$built" "$bin_dir/$(basename "$built")"
    fi
done
say "$bin_dir: pulumi $("$bin_dir/pulumi" version), pulumi-resource-command $COMMAND_VERSION, pulumi-language-python $LANGUAGE_HOST_VERSION"
