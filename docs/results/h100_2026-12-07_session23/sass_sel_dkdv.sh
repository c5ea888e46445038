#!/usr/bin/env bash
# The selected dK/dV pass (with the dS store) compiled for sm_90 without a GPU, as at 64k (bf16, G = 16, d = 128):
# registers, stack and each loop's instructions, per K/V placement and stage count. From the repo root:
#   bash docs/results/h100_2026-12-07_session23/sass_sel_dkdv.sh > sass_sel_dkdv.txt
cd "$(dirname "$0")/../../../benchmarks"
SIG='{"Q":"*bf16","K":"*bf16","V":"*bf16","DO":"*bf16","LSE":"*fp32","DELTA":"*fp32","DK_":"*fp32","DV_":"*fp32",
"QLIST":"*i32","ITEM_KEY":"*i32","ITEM_START":"*i32","ITEM_END":"*i32","CU":"*i32","T_FIXED":"i32","TK_FIXED":"i32",
"QOFF":"i32","KBASE":"i32","NS_MAX":"i32","scale":"fp32","GATE":"*fp32","DSB":"*bf16","OFFS":"*i64","PAIR0":"i32",
"PAIR1":"i32"}'
for run in "false 1 4" "false 2 4" "false 3 4" "true 1 4" "true 2 4" "true 3 4" "false 2 8"; do
  set -- $run; kv=$1; st=$2; warps=$3
  {
    echo "== KV_IN_LOOP=$kv stages=$st warps=$warps"
    TRITON_DEFAULT_FP_FUSION=1 python sass_loops.py nsa_parallel.kernels.select _sel_bwd_dkdv_kernel --sig "$SIG" \
      --const '{"HQ":64,"HKV":4,"G":16,"GP":16,"DK":128,"DV":128,"BDK":128,"BDV":128,"BS":64,"BLOCK_Q":4,
"VARLEN":false,"GATED":true,"STORE_DS":true,"INITIAL":1,"LOCAL":2,"KV_IN_LOOP":'$kv'}' --warps $warps \
      --stages $st --top 60 --divisible Q,K,V,DO,LSE,DELTA,DK_,DV_,QLIST,T_FIXED,TK_FIXED,DSB
  }
done
