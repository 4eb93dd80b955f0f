# Sourced by the scripts: a cached venv per host env, keyed by its pinned constraints file, kept outside
# the checkout (MMTUNING_CACHE, default ~/.cache/mmtuning) so CI reuses it between runs.
# usage: ensure_venv NAME PYTHON CONSTRAINTS "PIP INSTALL ARGS..."  -> prints the venv path
set -euo pipefail
shopt -s inherit_errexit  # a failing step inside $(...) (a venv build) stops the script instead of going on
MMTUNING_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MMTUNING_CACHE="${MMTUNING_CACHE:-$HOME/.cache/mmtuning}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CACHE_DIR="${PIP_CACHE_DIR:-$MMTUNING_CACHE/pip}"

ensure_venv() {
  local name="$1" python="$2" constraints="$3" install_args="$4"
  local key
  key=$( (cat "$MMTUNING_ROOT/$constraints"; echo "$install_args"; "$python" --version) | sha256sum | cut -c1-16)
  local venv="$MMTUNING_CACHE/venvs/$name-$key"
  if [ ! -f "$venv/.complete" ]; then
    echo "[mmtuning] building venv $name at $venv (first run only)" >&2
    rm -rf "$venv"
    # shellcheck disable=SC2086
    if ! { "$python" -m venv "$venv" >&2 && "$venv/bin/pip" install -q -c "$MMTUNING_ROOT/$constraints" $install_args >&2; }; then
      rm -rf "$venv"  # never leave a half-built venv that a later run would take for a complete one
      echo "[mmtuning] building venv $name failed (see pip's output above); nothing was cached" >&2
      return 1
    fi
    touch "$venv/.complete"
  fi
  echo "$venv"
}

# The package itself goes in editable on every run (seconds), so entry points follow pyproject.toml.
with_mmtuning() {
  "$1/bin/pip" install -q --no-deps --no-build-isolation -e "$MMTUNING_ROOT" >&2
  echo "$1"
}

core_venv() {
  local venv
  venv=$(ensure_venv core python3.11 constraints/core.txt "torch transformers peft bitsandbytes accelerate pluggy typer pydantic safetensors rich pyyaml pillow tokenizers pytest matplotlib tqdm")
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
