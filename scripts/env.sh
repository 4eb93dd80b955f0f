# Sourced by the scripts: a cached venv per host env, keyed by its pinned constraints file, kept outside
# the checkout (MMTUNING_CACHE, default ~/.cache/mmtuning) so CI reuses it between runs.
# usage: ensure_venv NAME PYTHON CONSTRAINTS "PIP INSTALL ARGS..."  -> prints the venv path
set -euo pipefail
shopt -s inherit_errexit  # a failing step inside $(...) (a venv build) stops the script instead of going on
MMTUNING_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MMTUNING_CACHE="${MMTUNING_CACHE:-$HOME/.cache/mmtuning}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CACHE_DIR="${PIP_CACHE_DIR:-$MMTUNING_CACHE/pip}"

# uv builds a venv in seconds where pip takes minutes; it is on the package registry, so the first build
# bootstraps it into the cache (MMTUNING_UV=pip forces pip; a failed bootstrap falls back to pip).
uv_tool() {
  [ "${MMTUNING_UV:-}" = pip ] && return 1
  if [ -n "${MMTUNING_UV:-}" ]; then echo "$MMTUNING_UV"; return 0; fi
  local boot="$MMTUNING_CACHE/uv-tool"
  if [ ! -x "$boot/bin/uv" ]; then
    mkdir -p "$MMTUNING_CACHE"
    python3 -m venv "$boot.tmp.$BASHPID" >&2 && "$boot.tmp.$BASHPID/bin/pip" install -q uv >&2 \
      && { rm -rf "$boot"; mv "$boot.tmp.$BASHPID" "$boot"; } || { rm -rf "$boot.tmp.$BASHPID"; return 1; }
  fi
  # The venv's scripts point at the folder it was built in; call uv's binary by its real path.
  "$boot/bin/python" -c 'import uv, sys; sys.stdout.write(uv.find_uv_bin())'
}

# uv reads no pip.conf: hand it pip's find-links and extra indexes (local wheel mirrors, where a machine has
# them) and pip's way of choosing among several indexes (the best version wherever it is).
uv_env_from_pip() {
  local line key value
  while IFS= read -r line; do
    key=${line%%=*}; value=${line#*=}; value=${value#\'}; value=${value%\'}
    case "$key" in
      *.find-links) export UV_FIND_LINKS="$value" ;;
      *.extra-index-url) export UV_EXTRA_INDEX_URL="$value" ;;
      *.index-url) export UV_INDEX_URL="$value" ;;
    esac
  done < <(python3 -m pip config list 2>/dev/null || true)
  export UV_INDEX_STRATEGY=unsafe-best-match UV_CACHE_DIR="${UV_CACHE_DIR:-$MMTUNING_CACHE/uv}"
}

# Packages whose build imports torch (DeepSpeed's setup.py) go in after the rest, built against the venv's own
# torch: an isolated build would fetch a torch of its own (the CUDA wheels, gigabytes) just to read its version.
install_late() {  # VENV CONSTRAINTS ARGS...
  local venv="$1" constraints="$2"; shift 2
  local uv
  if uv=$(uv_tool); then
    uv_env_from_pip
    "$uv" pip install -q --python "$venv/bin/python" --no-build-isolation -c "$constraints" "$@" >&2
  else
    "$venv/bin/pip" install -q --no-build-isolation -c "$constraints" "$@" >&2
  fi
}

install_into_venv() {  # VENV PYTHON CONSTRAINTS ARGS...: build VENV and install ARGS under CONSTRAINTS
  local venv="$1" python="$2" constraints="$3"; shift 3
  local uv
  if uv=$(uv_tool); then
    uv_env_from_pip
    "$uv" venv -q --seed --python "$python" "$venv" >&2 \
      && "$uv" pip install -q --python "$venv/bin/python" -c "$constraints" "$@" >&2
  else
    "$python" -m venv "$venv" >&2 && "$venv/bin/pip" install -q -c "$constraints" "$@" >&2
  fi
}

ensure_venv() {  # NAME PYTHON CONSTRAINTS "ARGS" ["LATE ARGS": built against the venv's torch, see install_late]
  local name="$1" python="$2" constraints="$3" install_args="$4" late_args="${5:-}"
  local key
  key=$( (cat "$MMTUNING_ROOT/$constraints"; echo "$install_args"; [ -z "$late_args" ] || echo "$late_args"
          "$python" --version) | sha256sum | cut -c1-16)
  local venv="$MMTUNING_CACHE/venvs/$name-$key"
  if [ ! -f "$venv/.complete" ]; then
    echo "[mmtuning] building venv $name at $venv (first run only)" >&2
    local started=$SECONDS
    rm -rf "$venv"
    # shellcheck disable=SC2086
    if ! install_into_venv "$venv" "$python" "$MMTUNING_ROOT/$constraints" $install_args \
        || { [ -n "$late_args" ] && ! install_late "$venv" "$MMTUNING_ROOT/$constraints" $late_args; }; then
      rm -rf "$venv"  # never leave a half-built venv that a later run would take for a complete one
      echo "[mmtuning] building venv $name failed (see the installer's output above); nothing was cached" >&2
      return 1
    fi
    touch "$venv/.complete"
    echo "[mmtuning] venv $name built in $((SECONDS - started)) s" >&2
  fi
  echo "$venv"
}

# Builds the named venvs (core, newest, llamafactory, axolotl) side by side, each a few minutes on an empty
# cache and seconds once cached; sets VENV_<name> to each path. A failed build prints its log and returns 1.
prepare_venvs() {
  local logs name pids=() failed=0
  logs=$(mktemp -d)
  echo "[mmtuning] venvs: $* (built side by side where missing; cached under $MMTUNING_CACHE/venvs)" >&2
  uv_tool >/dev/null || echo "[mmtuning] uv could not be installed; building with pip (slower)" >&2
  for name in "$@"; do
    ( "${name}_venv" >"$logs/$name.path" 2>"$logs/$name.log" ) &
    pids+=($!)
  done
  local i=0
  for name in "$@"; do
    if ! wait "${pids[$i]}"; then failed=1; echo "[mmtuning] venv $name: build failed:" >&2; cat "$logs/$name.log" >&2
    else grep '^\[mmtuning\]' "$logs/$name.log" >&2 || true
    fi
    printf -v "VENV_$name" '%s' "$(cat "$logs/$name.path")"
    i=$((i + 1))
  done
  rm -rf "$logs"
  return $failed
}

# The package itself goes in editable on every run (seconds), so entry points follow pyproject.toml.
# One at a time (flock): venvs built side by side would write the checkout's egg-info together.
with_mmtuning() {
  mkdir -p "$MMTUNING_CACHE"
  flock "$MMTUNING_CACHE/.editable.lock" "$1/bin/pip" install -q --no-deps --no-build-isolation -e "$MMTUNING_ROOT" >&2
  echo "$1"
}

core_venv() {
  local venv
  venv=$(ensure_venv core python3.11 constraints/core.txt "torch transformers peft bitsandbytes accelerate pluggy typer pydantic safetensors rich pyyaml pillow tokenizers pytest matplotlib tqdm" "deepspeed")
  with_mmtuning "$venv"
}

# The core packages with the newest transformers release (constraints/newest.txt): only the coverage test runs
# here, so a module rename in a new transformers shows up as a failing model type. Same wheels as core otherwise
# (pip cache): about a minute to build once, then cached.
newest_venv() {
  local venv
  venv=$(ensure_venv newest python3.11 constraints/newest.txt "torch transformers peft bitsandbytes accelerate pluggy typer pydantic safetensors rich pyyaml pillow tokenizers pytest tqdm")
  with_mmtuning "$venv"
}

llamafactory_venv() {
  # LLaMA-Factory 0.9.5 pins transformers <=5.6 / peft <=0.18.1 and imports torchaudio, so it gets its own venv
  # (PyPI torch 2.11 + torchvision 0.26 + torchaudio 2.11, built for each other) plus mmtuning's runtime deps.
  local venv
  venv=$(ensure_venv llamafactory python3.11 constraints/llamafactory.txt "setuptools torch torchvision torchaudio llamafactory bitsandbytes pluggy typer rich pyyaml pillow tokenizers pytest")
  with_mmtuning "$venv"
}

# Axolotl 0.21.0 needs Python 3.12 (pyenv's 3.12.1 is not on the default path); its own venv, since it pins
# transformers/peft versions of its own. Prints nothing and returns 1 where no Python 3.12 exists.
axolotl_python() {
  local prefix
  prefix=$(pyenv prefix 3.12.1 2>/dev/null || true)
  if [ -n "$prefix" ] && "$prefix/bin/python3.12" --version >/dev/null 2>&1; then
    echo "$prefix/bin/python3.12"
  elif python3.12 --version >/dev/null 2>&1; then
    command -v python3.12
  else
    return 1
  fi
}

axolotl_venv() {
  local venv python
  if python=$(axolotl_python); then
    venv=$(ensure_venv axolotl "$python" constraints/axolotl.txt "axolotl==0.21.0 torchvision pluggy rich typer pyyaml pillow tokenizers pytest")
  else
    # No Python 3.12 here: Axolotl 0.19.0, the last release for 3.11 (same plugin hooks, see FACTS.md). Without
    # torchvision: PyPI's build does not load against the local CPU torch, so the Qwen2-VL run is skipped there.
    venv=$(ensure_venv axolotl019 python3.11 constraints/axolotl-0.19.txt "axolotl==0.19.0 torch==2.13.0 pluggy rich typer pyyaml pillow tokenizers pytest")
  fi
  with_mmtuning "$venv"
}
