#!/usr/bin/env bash
# The gpu-marked tests, each in its own pytest process, JOBS (default 8) at a time, so that Triton compiles their
# kernels on all of the GPU machine's cores: one process ran 4 kernel tests in 420 s on a cold machine (twenty-fifth
# session), nearly all of it compiling. Correctness only (the tests share the GPU; nothing here is timed).
#
#   out=$OUT; source benchmarks/gpu_env.sh; bash benchmarks/gpu_tests.sh $OUT [PYTEST_ARGS...]
#
# PYTEST_ARGS select the tests (default: -m gpu tests/test_triton_kernels.py). Each test's log goes to
# OUT/gpu_tests/<test id, sanitised>.log, a line per test to OUT/gpu_tests/summary.txt; a test that does not pass
# beside the others runs again alone (that run decides); exits 1 if any test did not pass.
set -u
out=$1
shift
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(-m gpu tests/test_triton_kernels.py)
dir="$out/gpu_tests"
mkdir -p "$dir"
python3 -P -m pytest -q --collect-only -p no:cacheprovider "${args[@]}" | grep '::' > "$dir/ids.txt"
# -m "": the ids are chosen above; without it the project's default marker filter (not gpu) deselects them
# shellcheck disable=SC2016
xargs -P "${JOBS:-8}" -I{} sh -c \
  'python3 -P -m pytest -q -p no:cacheprovider -m "" "$1" > "$2/$(printf %s "$1" | tr -c "A-Za-z0-9._-" _).log" 2>&1' \
  _ {} "$dir" < "$dir/ids.txt"
status=0
: > "$dir/summary.txt"
result_of() { grep -E "[0-9]+ (passed|failed|skipped|error)" "$1" | tail -1; }
while read -r id; do
  log="$dir/$(printf %s "$id" | tr -c "A-Za-z0-9._-" _).log"
  result=$(result_of "$log")
  note=""
  case "$result" in
    *failed*|*error*|"")
      # tests that share the GPU can run it out of memory (a 64k test beside the others did, twenty-sixth
      # session): a test that did not pass runs again alone, and that run decides; both logs are kept
      mv "$log" "${log%.log}.shared.log"
      python3 -P -m pytest -q -p no:cacheprovider -m "" "$id" > "$log" 2>&1
      note=" (run alone; beside the others: ${result:-no result})"
      result=$(result_of "$log")
      ;;
  esac
  echo "$id: ${result:-no result}$note" | tee -a "$dir/summary.txt"
  case "$result" in *failed*|*error*|"") status=1 ;; esac
done < "$dir/ids.txt"
exit $status
