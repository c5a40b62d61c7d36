#!/usr/bin/env bash
# Download bench/gpu_wheels.txt's wheels (for the GPU machine: CPython 3.12, manylinux x86-64)
# plus cpufeature's sdist (ktransformers' setup.py imports it) and the upstream sdist into .whl/,
# which bench/gpu_run.sh reads there. Run from the repo root on a machine with PyPI access:
#   bash bench/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .gitignore || { echo "error: .whl/ must be git-ignored (see .gitignore)" >&2; exit 2; }
plat=()
for n in 28 27 17; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
grep -vE '^\s*(#|$)' bench/gpu_wheels.txt > .whl/requirements.txt
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d .whl -r .whl/requirements.txt
# refs whose engine needs other versions: bench/gpu_wheels-REF.txt -> .whl/REF/ (gpu_run.sh REF installs them over the set above)
for extra in bench/gpu_wheels-*.txt; do
  r="$(basename "$extra" .txt)"; r="${r#gpu_wheels-}"
  mkdir -p ".whl/$r"
  grep -vE '^\s*(#|$)' "$extra" > ".whl/$r/requirements.txt"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d ".whl/$r" -r ".whl/$r/requirements.txt"
done
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl cpufeature==0.2.1
# the upstream sdist, hash-checked by fetch-source, where KTLEGACY_CACHE=.whl finds it
KTLEGACY_CACHE=.whl python3 -c "from ktlegacy.core.source import fetch_source; import tempfile, pathlib; fetch_source(pathlib.Path(tempfile.mkdtemp()) / 't', '0.2.1.post1')" >/dev/null
ls -la .whl
du -sh .whl
