# run 7: the final kernels (working tree: HEAD + the selected dq loop at 3 stages for G=16): targeted GPU tests,
# backward-only A/B against HEAD's kernels (build/head), the core beside its peers at 64k, then 128k
out=$OUT; source benchmarks/gpu_env.sh >/dev/null 2>&1
D=docs/results/selection_h100_2026-11-24_session14
timeout 150 python3 -P -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_kernels.py \
  -k "4096-64-4-128" > $OUT/gpu_tests.log 2>&1; echo "pytest rc=$?"; tail -2 $OUT/gpu_tests.log
rm -rf /tmp/pkg_head && cp -r /tmp/pkg /tmp/pkg_head && rm -rf /tmp/pkg_head/nsa_parallel/kernels \
  && cp -r build/head/kernels /tmp/pkg_head/nsa_parallel/kernels
for i in 1 2 3; do
  PYTHONPATH=/tmp/pkg_head:/tmp/site python3 -P $D/bwd_ab.py 65536 head | tee -a $OUT/bwd_ab.jsonl
  python3 -P $D/bwd_ab.py 65536 new | tee -a $OUT/bwd_ab.jsonl
done
python3 -P -m nsa_parallel.bench --seqlens 65536 --dense-max-t 65536 --no-flex --out $OUT/bench_peers.json 2>&1 \
  | tail -3
timeout 150 python3 -P -m nsa_parallel.bench --seqlens 131072 --dense-max-t 0 --no-fla --no-flex \
  --out $OUT/bench_128k.json 2>&1 | tail -1
