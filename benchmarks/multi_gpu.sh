#!/usr/bin/env bash
# The measurements of several GPUs on one host (issue 14), one stage per call so that each fits a
# 10-minute device command. Run from the repository root after `pip install --no-deps -e .` (an editable
# install: the package maps `passes/` into `hcms_compile.passes`):
#
#     benchmarks/multi_gpu.sh STAGE [OUT]        # OUT defaults to $OUT or ./multi_gpu_out
#
# Stages, in the order to run them (each writes under OUT/<gpus>gpu/):
#   calibrate   `hcms calibrate` (copy-engine path included) -> profile.json, used by every later stage
#   serial      the hcms-2 layer at 16K over NCCL: one profiled step per rank (trace/rank{r}.json, every
#               rank's lanes on one time axis in lanes.png), Inductor's generated code (output_code.log)
#   fwd         layer and block, forward: Inductor alone, fused plain site, hcms-2/3/4 over NCCL and over
#               copy engines, auto; S = 8K, 16K, 32K, 56K
#   bwd         the same rows, forward+backward
#   conn1       the NCCL rows again with CUDA_DEVICE_MAX_CONNECTIONS=1 (forward, layer and block)
#   pcie        the NCCL rows and auto with NCCL_P2P_DISABLE=1: NCCL stages through host memory, as on
#               PCIe servers without peer access
#   wan         examples/wan22_ulysses.py (Wan2.2 A14B width, 1 block, 32,760 tokens) under diffusers'
#               context parallelism, Inductor alone against HCMS auto and 2 chunks, bitwise check
#               (needs diffusers: carry its wheel, see the device notes in BENCHMARKS.md)
#   dry         every stage but wan, small (S = 2K, the layer, fewer modes, 2 repeats): checks the script
#
# The GPU count is what `nvidia-smi -L` lists (GPUS=N overrides it). NVLink multicast stays off.
set -euo pipefail
stage=${1:?"a stage: calibrate serial fwd bwd conn1 pcie wan dry"}
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
out=${2:-${OUT:-multi_gpu_out}}/${gpus}gpu
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
[[ -f $out/profile.json ]] && export HCMS_PROFILE=$out/profile.json

seqs=(8192 16384 32768 56000)
repeats=10
targets=(layer block)
# comm-only and attention-only give the ideal time that the overlap efficiency is measured against
nccl_modes=(comm-only attention-only compiled hcms-1-nccl hcms-2-nccl hcms-3-nccl hcms-4-nccl hcms-auto)
all_modes=("${nccl_modes[@]}" hcms-1-ce hcms-2-ce hcms-3-ce hcms-4-ce)

hcms() { torchrun --standalone --nproc_per_node="$gpus" -m hcms_compile.cli "$@"; }

bench() {  # bench NAME [flags...]: one `hcms bench` run, its table in NAME.log, its rows in NAME.json
    local name=$1
    shift
    hcms bench --seq "${seqs[@]}" --repeats "$repeats" --json "$out/$name.json" --png "$out/$name.png" "$@" \
        2>&1 | tee "$out/$name.log"
}

run_stage() {
    case $1 in
    calibrate)
        hcms calibrate --out "$out/profile.json" 2>&1 | tee "$out/calibrate.log"
        export HCMS_PROFILE=$out/profile.json
        ;;
    serial)
        # one profiled step per rank; both ranks' lanes side by side answer "rank skew or stream order"
        hcms bench --seq 16384 --targets layer --modes compiled hcms-2-nccl --repeats "$repeats" \
            --trace "$out/trace" --trace-mode hcms-2-nccl --trace-seq 16384 --trace-png "$out/lanes.png" \
            --json "$out/serial.json" 2>&1 | tee "$out/serial.log"
        TORCH_LOGS=output_code hcms bench --seq 16384 --targets layer --modes hcms-2-nccl --repeats 1 --warmup 0 \
            >"$out/output_code.log" 2>&1
        ;;
    fwd) bench fwd --targets "${targets[@]}" --modes "${all_modes[@]}" ;;
    bwd) bench bwd --targets "${targets[@]}" --modes "${all_modes[@]}" --backward ;;
    conn1) CUDA_DEVICE_MAX_CONNECTIONS=1 bench conn1 --targets "${targets[@]}" --modes "${nccl_modes[@]}" ;;
    pcie) NCCL_P2P_DISABLE=1 bench pcie --targets "${targets[@]}" --modes "${nccl_modes[@]}" ;;
    wan)
        torchrun --standalone --nproc_per_node="$gpus" examples/wan22_ulysses.py --layers 1 --chunks auto,2 \
            --steps 5 2>&1 | tee "$out/wan.log"
        ;;
    *)
        echo "unknown stage $1: calibrate serial fwd bwd conn1 pcie wan dry" >&2
        exit 2
        ;;
    esac
}

if [[ $stage == dry ]]; then  # small and few: the layer only, one chunk count per exchange
    seqs=(2048)
    repeats=2
    targets=(layer)
    nccl_modes=(comm-only attention-only compiled hcms-2-nccl hcms-auto)
    all_modes=("${nccl_modes[@]}" hcms-2-ce)
    for s in calibrate serial fwd bwd conn1 pcie; do
        echo "== $s"
        run_stage "$s"
    done
else
    run_stage "$stage"
fi
