# Sourced by the scripts: a cached venv per host env, keyed by its pinned constraints file, kept outside
# the checkout (MMTUNING_CACHE, default ~/.cache/mmtuning) so CI reuses it between runs.
# usage: ensure_venv NAME PYTHON CONSTRAINTS "PIP INSTALL ARGS..."  -> prints the venv path
set -euo pipefail
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
    "$python" -m venv "$venv" >&2
    # shellcheck disable=SC2086
    "$venv/bin/pip" install -q -c "$MMTUNING_ROOT/$constraints" $install_args >&2
    touch "$venv/.complete"
  fi
  echo "$venv"
}

core_venv() {
  local venv
  venv=$(ensure_venv core python3.11 constraints/core.txt "torch transformers peft bitsandbytes accelerate pluggy typer pydantic safetensors rich pyyaml pillow tokenizers pytest matplotlib tqdm")
  # The package itself is installed editable on every run (seconds): entry points stay in step with pyproject.toml.
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$MMTUNING_ROOT" >&2
  echo "$venv"
}

llamafactory_venv() {
  # LLaMA-Factory 0.9.5 pins transformers <=5.6 / peft <=0.18.1 and imports torchaudio, so it gets its own venv
  # (PyPI torch 2.11 + torchvision 0.26 + torchaudio 2.11, built for each other) plus mmtuning's runtime deps.
  local venv
  venv=$(ensure_venv llamafactory python3.11 constraints/llamafactory.txt "setuptools torch torchvision torchaudio llamafactory bitsandbytes pluggy typer rich pyyaml pillow tokenizers pytest")
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$MMTUNING_ROOT" >&2
  echo "$venv"
}
