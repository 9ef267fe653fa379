#!/usr/bin/env bash
# One lent GPU's measurements (the GPU issue), in the order they matter, each under its own time limit and all
# under BUDGET seconds, so a short lease still returns the most important figures. Logs and JSON go to $OUT as
# one archive (the device tool returns at most 8 files); a summary is printed last.
#
#   bash bench/gpu_session.sh          # on the GPU machine, from the repository root; wheels in .whl/ if any
#   ONLY="decode-fp16 load" MODEL=random:tiny bash bench/gpu_session.sh   # some steps, to check the script
set -u
OUT=${OUT:-/tmp/gpu-session}
BUDGET=${BUDGET:-540}
MODEL=${MODEL:-random:llama-2-7b}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1 LMSERVE_CACHE_DIR=/tmp/lmserve-cache
deadline=$((SECONDS + BUDGET - 15))   # 15 s kept for the archive and the summary

step() {   # step NAME LIMIT COMMAND...: run COMMAND under min(LIMIT, time left), output in logs/NAME.log
    local name=$1 limit=$2 left=$((deadline - SECONDS)) start=$SECONDS rc
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    if [ "$left" -lt 20 ]; then echo "=== $name: skipped, out of time" | tee -a "$OUT/logs/steps.log"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout -k 5 "$limit" bash -c '"$@"' "$name" "$@" > "$OUT/logs/$name.log" 2>&1   # bash -c: functions too
    rc=$?
    echo "=== $name: rc $rc in $((SECONDS - start)) s (limit $limit)" | tee -a "$OUT/logs/steps.log"
}

load_test() {   # python -m server on the GPU, then bench.load --qps 200 against it; the server always stopped
    python3 -m server --model "$MODEL" --dtype float16 --max-batch-size 512 --api-server-count 4 --port 8000 \
        --grpc-port 50151 > "$OUT/logs/load-server.log" 2>&1 &
    local server=$!
    for _ in $(seq 90); do
        kill -0 $server 2> /dev/null || { echo "the server exited"; return 1; }
        python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=1)" \
            2> /dev/null && break
        sleep 1
    done
    timeout -k 5 60 python3 -m bench.load --qps "${QPS:-200}" --duration 12 --stream --prompt-tokens 128 --max-tokens 128 \
        --request-timeout 30 --no-progress --json "$OUT/logs/load.json"
    kill -TERM $server
    timeout 20 tail --pid=$server -f /dev/null || kill -KILL -- $server
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())"
} > "$OUT/logs/env.log" 2>&1
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUT/logs/wheels.log" 2>&1
    export PYTHONPATH=/tmp/site
fi

decode() { python3 -m bench.decode --model "$MODEL" --dtype float16 --json "$OUT/logs/$1.json" "${@:2}"; }
export -f decode load_test
export OUT MODEL QPS
step decode-fp16 120 decode decode-fp16 --quant none
step decode-fp16-eager 60 decode decode-fp16-eager --quant none --enforce-eager
step decode-int4 90 decode decode-int4 --quant int4
step decode-int8 70 decode decode-int8 --quant int8
step kernels-linear 100 env TRITON_PRINT_AUTOTUNING=1 python3 -m bench.kernels --only linear --m 1,2,8,16 \
    --json "$OUT/logs/kernels-linear.json"
step kernels-attention 60 python3 -m bench.kernels --only attention --json "$OUT/logs/kernels-attention.json"
step tests 90 python3 -m pytest -q -x -p no:cacheprovider tests/server/test_cuda_graphs.py \
    tests/kernels/test_paged_attention.py tests/kernels/test_rms_norm.py tests/kernels/test_rotary.py \
    tests/kernels/test_silu_and_mul.py tests/kernels/test_lora.py
step load 130 load_test
step decode-peer 110 decode decode-peer --quant none --peer transformers
step decode-int4-eager 50 decode decode-int4-eager --quant int4 --enforce-eager
step tests-quant 60 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_quant_matmul.py

{
    cat "$OUT/logs/env.log" "$OUT/logs/steps.log"
    for f in "$OUT"/logs/decode-*.log; do echo "--- $(basename "$f")"; grep -E "^(model|measured|[0-9]+% of|transformers)|Error|error" "$f" | tail -5; done
    for f in kernels-linear kernels-attention; do echo "--- $f"; grep -E "^(paged|fp16|int8|int4|device)" "$OUT/logs/$f.log"; done
    echo "--- load"; grep -vE "^\s*$" "$OUT/logs/load.log" | tail -30
    echo "--- tests"; tail -3 "$OUT/logs/tests.log"; tail -3 "$OUT/logs/tests-quant.log" 2>/dev/null
} > "$OUT/logs/summary.log" 2>&1
tar -czf "$OUT/gpu-session.tar.gz" -C "$OUT" logs && mv "$OUT/logs/summary.log" "$OUT/" && rm -rf "$OUT/logs"
cat "$OUT/summary.log"
