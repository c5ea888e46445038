# run 8: the bench with at least 10 timed runs per median (MIN_TIMED_RUNS): the core beside its peers at 64k,
# the core alone at 64k twice more (spread between identical runs), then 128k
out=$OUT; source benchmarks/gpu_env.sh >/dev/null 2>&1
python3 -P -m nsa_parallel.bench --seqlens 65536 --dense-max-t 65536 --no-flex --out $OUT/bench_peers.json 2>&1 \
  | tail -1
for i in 1 2; do
  python3 -P -m nsa_parallel.bench --seqlens 65536 --dense-max-t 0 --no-fla --no-flex --out $OUT/bench_64k_$i.json \
    2>&1 | tail -1
done
python3 -P -m nsa_parallel.bench --seqlens 131072 --dense-max-t 0 --no-fla --no-flex --out $OUT/bench_128k.json 2>&1 \
  | tail -1
