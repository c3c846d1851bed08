#!/usr/bin/env bash
# Every optional extra of pyproject.toml, installed ALONE into a fresh copy of a core-only virtual
# environment (torch==2.13.0 + mergelab + pytest), must make its feature importable: tests/test_extras.py
# with MERGELAB_EXTRA=<extra> imports the feature's modules (a missing one fails), and the lm-eval
# adapter's tests run for lmeval. `test` and `lint` are skipped here: .ci/run installs and runs them itself.
# Run by .ci/run; needs the package registry and about 3 GB of scratch disk (one copy at a time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
work=$(mktemp -d "${TMPDIR:-/tmp}/mergelab-extras.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/core"
"$work/core/bin/python" -m pip install -q torch==2.13.0 -e . "pytest>=8" "pytest-timeout>=2.3"
extras=$("$work/core/bin/python" - <<'PYEOF'
import re
text = open("pyproject.toml").read()
section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
print(" ".join(re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, re.M)))
PYEOF
)
echo "extras: $extras"
for extra in $extras; do
    case $extra in
        test | lint) echo "extra $extra: exercised by .ci/run itself"; continue ;;
    esac
    start=$SECONDS
    rm -rf "$work/env"
    cp -a "$work/core" "$work/env"
    "$work/env/bin/python" -m pip install -q -e ".[$extra]"
    tests=(tests/test_extras.py)
    case $extra in
        lmeval) tests+=(tests/bench/eval/test_lm_eval_adapter.py) ;;
        search) tests+=(tests/search) ;;
    esac
    MERGELAB_EXTRA=$extra CI=1 "$work/env/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
    echo "extra $extra ok ($((SECONDS - start)) s)"
done
