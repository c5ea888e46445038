# run 2: the selected dK/dV pass on a side stream beside the flash backward kernels (A/B/C), core at 64k
out=$OUT; source benchmarks/gpu_env.sh >/dev/null 2>&1
D=docs/results/selection_h100_2026-11-24_session14
B="--seqlens 65536 --dense-max-t 0 --no-fla --no-flex"
python3 -P $D/bench_with.py kernels.parallel.OVERLAP_SELECTED_DKDV=False -- $B --out $OUT/bench2_off.json 2>&1 | tail -4
python3 -P $D/bench_with.py kernels.parallel.OVERLAP_SELECTED_DKDV=True -- $B --out $OUT/bench2_on.json 2>&1 | tail -4
python3 -P $D/bench_with.py kernels.parallel.SIDE_STREAM_PRIORITY=-1 -- $B --out $OUT/bench2_hi.json 2>&1 | tail -4
python3 -P $D/bench_with.py kernels.parallel.OVERLAP_SELECTED_DKDV=False -- $B --out $OUT/bench2_off2.json 2>&1 | tail -4
