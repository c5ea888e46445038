# run 4: gate gradient / deltas inside the branches' dq kernels (working tree) against HEAD's kernels
# (build/head, carried: `git archive HEAD kernels | tar -x -C build/head`), interleaved, core at 64k
out=$OUT; source benchmarks/gpu_env.sh >/dev/null 2>&1
rm -rf /tmp/pkg_head && cp -r /tmp/pkg /tmp/pkg_head && rm -rf /tmp/pkg_head/nsa_parallel/kernels \
  && cp -r build/head/kernels /tmp/pkg_head/nsa_parallel/kernels
B="--seqlens 65536 --dense-max-t 0 --no-fla --no-flex"
for i in 1 2; do
  PYTHONPATH=/tmp/pkg_head:/tmp/site python3 -P -m nsa_parallel.bench $B --out $OUT/bench4_head$i.json 2>&1 | tail -1
  python3 -P -m nsa_parallel.bench $B --out $OUT/bench4_new$i.json 2>&1 | tail -1
done
