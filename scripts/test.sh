#!/usr/bin/env bash
# The test suite: everything against the installed package and its compiled libraries, then the
# kernel and concurrency tests again against an AddressSanitizer + UBSan build of the ORT library.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=ignore
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"

echo "== kernel tests under AddressSanitizer + UndefinedBehaviorSanitizer"
export ORT_INCLUDE_DIR="${ORT_INCLUDE_DIR:-$(bash plugins/fetch_headers.sh ort)}"
cmake -S plugins -B build/asan -DMOE_EXPORT_SANITIZE=ON -DMOE_EXPORT_CUDA=OFF >/dev/null
cmake --build build/asan >/dev/null
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
MOE_EXPORT_OP_LIBRARY="$PWD/build/asan/libmoe_export_ort.so" \
  .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_kernel.py tests/test_concurrency.py
