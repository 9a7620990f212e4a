#!/usr/bin/env bash
# What a session runs on the lent GPU machine (the `device` tool): the GPU-only tests, the
# quickstart trained on the GPU, TensorRT-RTX engines (FP32 / FP16 / INT8) built for that
# GPU and scored with the nuScenes metrics, side-by-side latency (`imkd bench`), and the
# training throughput of both presets. TensorRT-RTX is ~64 MiB packed, over one call's
# limit, so it travels in two halves (../shared/tools/rtx-bundle.sh) and this runs in two
# calls BACK TO BACK (the machine is given back ~30 s after a call; /tmp survives between).
#
# Here, once:  ../shared/tools/rtx-bundle.sh          (writes .rtx-1/ and .rtx-2/)
#              the device README's `pip download` for python 3.12 into .whl/:
#              nuscenes-devkit==1.2.0 pyquaternion==0.9.9 cachetools onnxruntime-extensions==0.15.2
# Call 1:  carry [".rtx-1", ".whl"]   command: bash benchmarks/gpu_session.sh 1
# Call 2:  carry [".rtx-2"]           command: bash benchmarks/gpu_session.sh 2
# Alone:   carry [".whl"]             command: bash benchmarks/gpu_session.sh 3   (torch on the GPU; no TensorRT)
# Logs and JSON come back from $OUT.
set -uo pipefail
phase=${1:?phase 1 or 2}
OUT=${OUT:-/tmp/imkd-gpu-out}
W=/tmp/imkd-gpu
QS=$W/qs
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/rtx:$PWD${PYTHONPATH:+:$PYTHONPATH}
export LD_LIBRARY_PATH=/tmp/rtx/tensorrt_rtx_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
imkd() { python3 -m imkd_deploy "$@"; }
step() { echo; echo "=== $* ($(date +%T))"; }

# s/step of a run directory's metrics.jsonl, first logged step excluded (CUDA warm-up)
throughput() {
  python3 - "$1" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
a, b = rows[0], rows[-1]
print(f"{sys.argv[1]}: {(b['elapsed_s'] - a['elapsed_s']) / max(b['step'] - a['step'], 1):.3f} s/step "
      f"over steps {a['step']}..{b['step']}, last total loss {b['total']:.3f}")
EOF
}

case $phase in
1)
  step "stage TensorRT-RTX half 1, install the wheels the image lacks"
  bash .rtx-1/stage.sh
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  { nvidia-smi; python3 -c "import torch, numpy, onnxruntime; print('torch', torch.__version__, 'numpy', numpy.__version__,
'ort', onnxruntime.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"; } 2>&1 | tee "$OUT/machine.txt"

  step "GPU tests without TensorRT: the ops on CUDA, and the trainer on CUDA (bf16 autocast)"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests/ops 2>&1 | tee "$OUT/pytest_ops.log"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/distill/test_trainer.py -k "not ddp" 2>&1 \
    | tee "$OUT/pytest_trainer.log"

  step "quickstart, trained on the GPU"
  if ! timeout 300 python3 -m imkd_deploy quickstart --workdir "$QS" 2>&1 | tee "$OUT/quickstart.log"; then
    # phase 2 needs the exports: finish the failed steps on the CPU (finished steps are reused)
    step "quickstart failed on the GPU: rerun on the CPU"
    CUDA_VISIBLE_DEVICES= timeout 240 python3 -m imkd_deploy quickstart --workdir "$QS" 2>&1 | tee "$OUT/quickstart_cpu.log"
  fi

  step "training throughput, nuscenes_r50 (teacher, then an IMKD student distilled from it)"
  R=$W/r50
  timeout 120 python3 -m imkd_deploy train teacher --config nuscenes_r50 --dataroot "$QS/drive" --max-steps 40 \
    --out "$R/teacher" > "$OUT/r50_train.log" 2>&1 && throughput "$R/teacher" | tee "$OUT/throughput.txt"
  timeout 120 python3 -m imkd_deploy train student --config nuscenes_r50 --dataroot "$QS/drive" --max-steps 40 \
    --teacher "$R/teacher/checkpoints/last.safetensors" --distill all --out "$R/student" >> "$OUT/r50_train.log" 2>&1 \
    && throughput "$R/student" | tee -a "$OUT/throughput.txt"
  throughput "$QS/teacher" | tee -a "$OUT/throughput.txt"
  throughput "$QS/student" | tee -a "$OUT/throughput.txt"
  tail -5 "$OUT/r50_train.log"
  ;;
2)
  step "stage TensorRT-RTX half 2"
  bash .rtx-2/stage.sh
  if [ ! -f /tmp/rtx/.done ] || [ ! -d "$QS/export" ]; then
    echo "phase 1's files are gone (the machine was given back between the calls): run phase 1 again"; exit 3
  fi
  python3 -c "import tensorrt_rtx_bindings as t; print('tensorrt-rtx', t.__version__)" | tee "$OUT/rtx.txt"

  step "GPU tests"
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/runtime/test_trt_backend.py tests/engines 2>&1 \
    | tee "$OUT/pytest_gpu.log"

  if ! python3 -c "
from imkd_deploy.engines.flavour import load_tensorrt
from imkd_deploy.engines.sidecar import current_compute_capability
raise SystemExit(current_compute_capability() not in load_tensorrt('tensorrt-rtx').rtx_compute_capabilities())"; then
    step "TensorRT-RTX does not run on this GPU: what a user sees"
    imkd build-engine --model "$QS/export/student_tensorrt.onnx" --set "$(ls "$QS"/calibration/mini_train_*.txt | head -1)" \
      --dataroot "$QS/drive" --compute-capability current --out "$W/engines/fp32.engine" 2>&1 | tee "$OUT/build.log"
    imkd build-engine --model "$QS/export/student_tensorrt.onnx" --set "$(ls "$QS"/calibration/mini_train_*.txt | head -1)" \
      --dataroot "$QS/drive" --out "$W/engines/fp32.engine" 2>&1 | tee -a "$OUT/build.log"
    imkd infer --model "$W/engines/fp32.engine" --dataroot "$QS/drive" --split mini_val 2>&1 | tee "$OUT/infer.log"
    exit 0
  fi

  step "engines for this GPU: FP32, FP16, INT8 (the quickstart's --ops tensorrt export and calibration set)"
  SET=$(ls "$QS"/calibration/mini_train_*.txt | head -1)
  ONNX=$QS/export/student_tensorrt.onnx
  E=$W/engines
  {
    imkd build-engine --model "$ONNX" --set "$SET" --dataroot "$QS/drive" --compute-capability current --out "$E/fp32.engine"
    imkd build-engine --model "$ONNX" --precision fp16 --set "$SET" --dataroot "$QS/drive" --compute-capability current --out "$E/fp16.engine"
    imkd build-engine --model "$QS/export/student_tensorrt.int8.onnx" --set "$SET" --dataroot "$QS/drive" --compute-capability current --out "$E/int8.engine"
  } 2>&1 | tee "$OUT/build.log"

  step "infer + nuScenes metrics on mini_val with each engine"
  for p in fp32 fp16 int8; do
    timeout 120 python3 -m imkd_deploy infer --model "$E/$p.engine" --dataroot "$QS/drive" --split mini_val --eval \
      --out "$W/results/trt_$p.json" 2>&1 | tee -a "$OUT/infer.log"
  done
  grep -h '"nds"\|"map"' "$QS/summary.json" | head -20 > "$OUT/quickstart_scores.txt"

  step "latency, side by side (torch CPU is the reference of each run)"
  CKPT=$QS/student/checkpoints/last.safetensors
  for p in fp32 fp16 int8; do
    timeout 120 python3 -m imkd_deploy bench --dataroot "$QS/drive" --split mini_val --checkpoint "$CKPT" \
      --onnx "$QS/export/student_onnx.onnx" --int8 "$QS/export/student_onnx.int8.onnx" --engine "$E/$p.engine" \
      --frames 8 --rounds 5 --log "$OUT/bench_log.jsonl" 2>&1 | tee -a "$OUT/bench.log"
  done

  step "nuscenes_r50: export (--ops tensorrt), FP16 engine, latency against torch"
  R=$W/r50
  if [ -f "$R/student/checkpoints/last.safetensors" ]; then
    timeout 200 python3 -m imkd_deploy export --checkpoint "$R/student/checkpoints/last.safetensors" --ops tensorrt \
      --dataroot "$QS/drive" --out "$R/student_tensorrt.onnx" 2>&1 | tee "$OUT/r50.log"
    timeout 200 python3 -m imkd_deploy build-engine --model "$R/student_tensorrt.onnx" --precision fp16 --set "$SET" \
      --dataroot "$QS/drive" --compute-capability current --out "$R/fp16.engine" 2>&1 | tee -a "$OUT/r50.log"
    timeout 150 python3 -m imkd_deploy bench --dataroot "$QS/drive" --split mini_val \
      --checkpoint "$R/student/checkpoints/last.safetensors" --engine "$R/fp16.engine" --frames 6 --rounds 3 \
      --log "$OUT/bench_log.jsonl" 2>&1 | tee -a "$OUT/r50.log"
  fi
  ;;
3)
  # Needs no TensorRT: carry [".whl"] alone. Latency of the torch runtime on the GPU beside ONNX
  # Runtime on the CPU, for tiny and nuscenes_r50 (the engines' place on an H100 / H200, where
  # TensorRT-RTX does not run and full TensorRT does not travel).
  step "install the wheels; the runtime tests on a GPU machine"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  timeout 200 python3 -m pytest -q -p no:cacheprovider -n 4 -W ignore tests/runtime/test_infer.py tests/calibration/test_quantize.py \
    2>&1 | tail -15 | tee "$OUT/pytest_runtime.log"
  step "tiny: short quickstart, then bench (torch on CUDA, ONNX Runtime FP32 / INT8 on the CPU)"
  timeout 200 python3 -m imkd_deploy quickstart --workdir "$QS" --teacher-steps 40 --student-steps 40 > "$OUT/quickstart.log" 2>&1
  timeout 120 python3 -m imkd_deploy bench --dataroot "$QS/drive" --split mini_val --checkpoint "$QS/student/checkpoints/last.safetensors" \
    --onnx "$QS/export/student_onnx.onnx" --int8 "$QS/export/student_onnx.int8.onnx" --frames 8 --rounds 5 \
    --log "$OUT/bench_log.jsonl" 2>&1 | tee "$OUT/bench_tiny.log"
  step "nuscenes_r50: a plain student (5 steps; latency only), export --ops onnx, bench"
  R=$W/r50
  timeout 150 python3 -m imkd_deploy train student --config nuscenes_r50 --distill none --dataroot "$QS/drive" --max-steps 5 \
    --out "$R/plain" > "$OUT/r50.log" 2>&1
  timeout 200 python3 -m imkd_deploy export --checkpoint "$R/plain/checkpoints/last.safetensors" --dataroot "$QS/drive" \
    --out "$R/plain.onnx" >> "$OUT/r50.log" 2>&1
  timeout 200 python3 -m imkd_deploy bench --dataroot "$QS/drive" --split mini_val --checkpoint "$R/plain/checkpoints/last.safetensors" \
    --onnx "$R/plain.onnx" --frames 6 --rounds 3 --log "$OUT/bench_log.jsonl" 2>&1 | tee "$OUT/bench_r50.log"
  ;;
*) echo "phase must be 1, 2 or 3"; exit 2 ;;
esac
