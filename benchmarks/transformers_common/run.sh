#!/usr/bin/env bash
# Runs Transformers' common test mixins (ModelTesterMixin, GenerationTesterMixin, ProcessorTesterMixin) on this
# package's classes, the way the in-tree csm / dia / higgs_audio_v2 / mimi tests are written. Not part of CI: it needs
# the transformers source distribution of the installed version (from the package registry) plus `parameterized` and
# `pillow`, installed into a scratch folder. The sdist lacks tests/generation/test_utils.py, tests/exporters/ and
# utils/fetch_hub_objects_for_ci.py, so they are stubbed: GenerationTesterMixin adds no tests then
# (tests/test_transformers_conventions.py covers its calls). To run the real one, save the transformers repository's
# tests/generation/test_utils.py (of the version closest to the installed one) anywhere outside this repository and
# point GENERATION_TEST_UTILS at it (see docs/architecture.md).
#
#   benchmarks/transformers_common/run.sh [pytest args]     # e.g. -k "Tokenizer" -x
#   GENERATION_TEST_UTILS=/path/to/test_utils.py benchmarks/transformers_common/run.sh -k "MiMoAudioModelTest"
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python}"
version="$("$python" -c 'import transformers; print(transformers.__version__)')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$python" -m pip download --quiet --no-deps --no-binary :all: "transformers==$version" -d "$work/sdist"
tar -xzf "$work"/sdist/transformers-*.tar.gz -C "$work/sdist"
"$python" -m pip install --quiet --target "$work/deps" parameterized pillow

mkdir -p "$work/suite/tests/generation" "$work/suite/tests/exporters" "$work/suite/tests/models" "$work/suite/utils"
cp "$work"/sdist/transformers-*/tests/*.py "$work/suite/tests/"
touch "$work/suite/tests/__init__.py" "$work/suite/tests/generation/__init__.py" \
    "$work/suite/tests/exporters/__init__.py" "$work/suite/tests/models/__init__.py"
stub='    """Stub: not in the sdist."""'
if [[ -n "${GENERATION_TEST_UTILS:-}" ]]; then
    cp "$GENERATION_TEST_UTILS" "$work/suite/tests/generation/test_utils.py"
else
    printf 'class GenerationTesterMixin:\n%s\n' "$stub" > "$work/suite/tests/generation/test_utils.py"
fi
printf 'class ExportTesterMixin:\n%s\n\n\nclass ExportGenerateTesterMixin(ExportTesterMixin):\n%s\n' "$stub" "$stub" \
    > "$work/suite/tests/exporters/test_export.py"
printf 'def url_to_local_path(url, *args, **kwargs):\n    return url\n' > "$work/suite/utils/fetch_hub_objects_for_ci.py"
cp -r "$here" "$work/suite/tests/models/mimo_audio"
sed -i "s#^GOLDEN = .*#GOLDEN = \"$repo/tests/fixtures/golden\"#" "$work/suite/tests/models/mimo_audio/__init__.py"

cd "$work/suite"
PYTHONPATH="$repo/src:$work/suite:$work/deps:${PYTHONPATH:-}" "$python" -m pytest tests/models/mimo_audio \
    -p no:cacheprovider -q "$@"
