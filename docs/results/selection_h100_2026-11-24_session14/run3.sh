# run 3: the shared-position selected kernels again, the union read back from a per-program scratch row
out=$OUT; source benchmarks/gpu_env.sh >/dev/null 2>&1
python3 -P benchmarks/tile_sweep.py --t 65536 --only sel_shared --out $OUT/sweep3.json > $OUT/sweep3.log 2>&1
python3 -c "
import json
for r in json.load(open('$OUT/sweep3.json'))['rows']:
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != 'branch'})"
