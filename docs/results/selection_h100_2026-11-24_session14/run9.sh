# run 9: GPU check of the union-walk refactor (G < 16: the bf16 core tests at G = 8 and 1, and the CPU suite's
# selected / packed tests compiled) and of tile_sweep's refactored TMA experiment kernels
out=$OUT; source benchmarks/gpu_env.sh >/dev/null 2>&1
timeout 240 python3 -P -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_triton_kernels.py \
  -k "2048-16-2 or 3000-8-8 or selected or packed" > $OUT/kernel_tests.log 2>&1; echo "pytest rc=$?"
tail -2 $OUT/kernel_tests.log
timeout 200 python3 -P benchmarks/tile_sweep.py --t 65536 --only sel_tma --out $OUT/sweep_tma.json > $OUT/sweep_tma.log 2>&1
echo "sweep rc=$?"; tail -4 $OUT/sweep_tma.log
