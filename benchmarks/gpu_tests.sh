#!/usr/bin/env bash
# The gpu-marked tests, each in its own pytest process, JOBS (default 8) at a time, so that Triton compiles their
# kernels on all of the GPU machine's cores: one process ran 4 kernel tests in 420 s on a cold machine (twenty-fifth
# session), nearly all of it compiling. Correctness only (the tests share the GPU; nothing here is timed).
#
#   out=$OUT; source benchmarks/gpu_env.sh; bash benchmarks/gpu_tests.sh $OUT [PYTEST_ARGS...]
#
# PYTEST_ARGS select the tests (default: -m gpu tests/test_triton_kernels.py). Each test's log goes to
# OUT/gpu_tests/<test id, sanitised>.log, a line per test to OUT/gpu_tests/summary.txt; exits 1 if any test did not
# pass.
set -u
out=$1
shift
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(-m gpu tests/test_triton_kernels.py)
dir="$out/gpu_tests"
mkdir -p "$dir"
python3 -P -m pytest -q --collect-only -p no:cacheprovider "${args[@]}" | grep '::' > "$dir/ids.txt"
# shellcheck disable=SC2016
xargs -P "${JOBS:-8}" -I{} sh -c \
  'python3 -P -m pytest -q -p no:cacheprovider "$1" > "$2/$(printf %s "$1" | tr -c "A-Za-z0-9._-" _).log" 2>&1' \
  _ {} "$dir" < "$dir/ids.txt"
status=0
: > "$dir/summary.txt"
while read -r id; do
  log="$dir/$(printf %s "$id" | tr -c "A-Za-z0-9._-" _).log"
  result=$(grep -E "[0-9]+ (passed|failed|skipped|error)" "$log" | tail -1)
  echo "$id: ${result:-no result}" | tee -a "$dir/summary.txt"
  case "$result" in *failed*|*error*|"") status=1 ;; esac
done < "$dir/ids.txt"
exit $status
