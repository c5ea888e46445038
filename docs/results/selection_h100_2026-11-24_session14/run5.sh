# run 5: backward-only A/B of the deltas in the dq kernels (working tree) against HEAD's kernels (build/head),
# 3 interleaved rounds at 64k, then the GPU tests of the working tree
out=$OUT; source benchmarks/gpu_env.sh >/dev/null 2>&1
D=docs/results/selection_h100_2026-11-24_session14
rm -rf /tmp/pkg_head && cp -r /tmp/pkg /tmp/pkg_head && rm -rf /tmp/pkg_head/nsa_parallel/kernels \
  && cp -r build/head/kernels /tmp/pkg_head/nsa_parallel/kernels
for i in 1 2 3; do
  PYTHONPATH=/tmp/pkg_head:/tmp/site python3 -P $D/bwd_ab.py 65536 head | tee -a $OUT/bwd_ab.jsonl
  python3 -P $D/bwd_ab.py 65536 new | tee -a $OUT/bwd_ab.jsonl
done
timeout 420 python3 -P -m pytest -q -p no:cacheprovider -m gpu tests > $OUT/gpu_tests.log 2>&1; echo "pytest rc=$?"
tail -5 $OUT/gpu_tests.log
