# run 1: the shared-position sweep of the selected query-major kernels, then the core at 64k with P = 1 and 2
out=$OUT; source benchmarks/gpu_env.sh >/dev/null 2>&1
D=docs/results/selection_h100_2026-11-24_session14
python3 -P benchmarks/tile_sweep.py --t 65536 --only sel_shared --out $OUT/sweep1.json > $OUT/sweep1.log 2>&1
tail -3 $OUT/sweep1.log
for p in 1 2; do
  python3 -P $D/bench_shared.py $p 0 -- --seqlens 65536 --dense-max-t 0 --no-fla --no-flex --out $OUT/bench1_p$p.json 2>&1 | tail -8
done
