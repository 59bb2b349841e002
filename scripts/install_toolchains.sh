#!/usr/bin/env bash
# Installs the HumanEval-X toolchains the evaluator (geex_jax/humaneval_x) runs programs with:
#   C++  g++ + Boost headers (CPP/22, CPP/137) + OpenSSL (CPP/162)
#   Java OpenJDK (javac/java)
#   JS   Node.js + npm package js-md5 (JavaScript/162), installed into the evaluator's cache
#   Go   golang-go + testify (GOPATH mode, offline)
#   Rust rustc + Debian crate sources rand/regex/md5 (built once by the evaluator, offline)
#   bubblewrap, the sandbox.
#
# Idempotent and fast when everything is present: it checks first and runs `apt-get update` only
# when a package is actually missing. Without root or apt-get it prints what is missing and exits 0
# (the evaluator then skips those languages with a clear reason, or fails under
# GEEX_REQUIRE_TOOLCHAINS=1).
#
# Environment: GEEX_EVAL_CACHE (default ~/.cache/geex-jax) is where js-md5 goes
# (<cache>/node/node_modules); the evaluator reads the same variable.
set -uo pipefail

CACHE="${GEEX_EVAL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/geex-jax}"
JS_MD5_VERSION="0.8.3"   # pinned: the API used by JavaScript/162 (md5(string) -> hex)

missing=()        # Debian packages to install
need() { missing+=("$1"); }

have() { command -v "$1" >/dev/null 2>&1; }
# Debian's crate sources live here; the evaluator compiles them once into its cache.
crate_present() { compgen -G "/usr/share/cargo/registry/$1-[0-9]*" >/dev/null; }

have g++                                    || need g++
[[ -f /usr/include/boost/version.hpp ]]     || need libboost-dev
[[ -f /usr/include/openssl/ssl.h ]]         || need libssl-dev
have javac && have java                     || need default-jdk
have node                                   || need nodejs
have npm                                    || need npm
have go || [[ -x /usr/lib/go/bin/go ]]      || need golang-go
[[ -d /usr/share/gocode/src/github.com/stretchr/testify ]] ||
                                               need golang-github-stretchr-testify-dev
# rustc from rustup (~/.cargo/bin) counts; otherwise Debian's rustc + cargo.
have rustc || [[ -x "$HOME/.cargo/bin/rustc" ]] || { need rustc; need cargo; }
have cargo || [[ -x "$HOME/.cargo/bin/cargo" ]] || need cargo
crate_present rand                          || need librust-rand-dev
crate_present regex                         || need librust-regex-dev
crate_present md5                           || need librust-md5-dev
have bwrap                                  || need bubblewrap

status=0
if ((${#missing[@]})); then
  # De-duplicate (cargo may be listed twice).
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  if [[ $(id -u) -eq 0 ]] && have apt-get; then
    echo "install_toolchains: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq &&
           apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
      echo "install_toolchains: apt-get failed; the evaluator will skip what is still missing" >&2
      status=1
    fi
  else
    echo "install_toolchains: missing (needs root and apt-get): ${missing[*]}"
    echo "install_toolchains: run as root: apt-get install ${missing[*]}"
  fi
fi

# js-md5 into the evaluator's cache (not the git tree): only when absent.
if [[ ! -f "$CACHE/node/node_modules/js-md5/package.json" ]]; then
  if have npm; then
    mkdir -p "$CACHE/node"
    if npm install --silent --no-audit --no-fund --prefix "$CACHE/node" \
         "js-md5@$JS_MD5_VERSION" >/dev/null; then
      echo "install_toolchains: js-md5@$JS_MD5_VERSION -> $CACHE/node/node_modules"
    else
      echo "install_toolchains: npm install js-md5 failed (JavaScript/162 will fail)" >&2
      status=1
    fi
  else
    echo "install_toolchains: npm missing: cannot install js-md5"
  fi
fi

if ((status == 0)) && ((${#missing[@]} == 0)); then
  echo "install_toolchains: all HumanEval-X toolchains present"
fi
# Never fail `make test` here: the evaluator reports what is missing (and CI's
# GEEX_REQUIRE_TOOLCHAINS=1 turns that into test failures).
exit 0
