#!/usr/bin/env bash
# One entry point for a fresh machine:
#   bash run.sh repro   # create/reuse the environment, then `dvc repro` the embedded default
#   bash run.sh test    # create/reuse the environment, then run the test suite
# Any other arguments after the command are passed on (e.g. `bash run.sh repro -s report`).
# The virtual environment lives outside the clone, keyed on the hash of requirements.txt, so
# later runs (and CI on the same machine) skip the ~5-minute install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")"

command=${1:-}
shift || true
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
hash=$(sha256sum requirements.txt | cut -c1-12)
venv="${DIFFREPRO_VENV:-$HOME/.cache/diffrepro/venv-$hash}"

if [ ! -f "$venv/.complete" ]; then
  echo "Creating the environment in $venv (first run: about 5 minutes)..."
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r requirements.txt
  touch "$venv/.complete"
fi

export PATH="$venv/bin:$PATH"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export DVC_NO_ANALYTICS=1
export MPLBACKEND=Agg

case "$command" in
  repro)
    git rev-parse --git-dir >/dev/null 2>&1 || { echo "error: run.sh repro needs a git clone (DVC records results in git)"; exit 2; }
    dvc repro "$@"
    ;;
  test)
    # One pytest-xdist worker per core (DIFFREPRO_TEST_WORKERS to change; 0 runs in this process);
    # tests/conftest.py orders the tests for worksteal's two halves.
    python -m pytest -q -n "${DIFFREPRO_TEST_WORKERS:-$(nproc)}" --dist worksteal tests "$@"
    ;;
  *)
    echo "usage: bash run.sh repro|test [extra args]" >&2
    exit 2
    ;;
esac
