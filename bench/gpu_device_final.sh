#!/usr/bin/env bash
# Last step of the CUDA fp16 latency run on a lent GPU machine (see docs/TARGETS.md):
# reassemble the onnxruntime-gpu parts carried in earlier calls, wait for the
# models made in the background (bench/gpu_fp16_latency.py make), time them.
set -uo pipefail
OUTDIR="${OUT:-/tmp/out}"
cp .gpu/ortgpu.part* /tmp/parts/ 2>/dev/null
cat /tmp/parts/ortgpu.part0 /tmp/parts/ortgpu.part1 /tmp/parts/ortgpu.part2 /tmp/parts/ortgpu.part3 > /tmp/ortgpu.tar.xz
echo "sha256 $(sha256sum /tmp/ortgpu.tar.xz | cut -c1-64) want $(cat .gpu/sha 2>/dev/null)"
mkdir -p /tmp/site && tar -xJf /tmp/ortgpu.tar.xz -C /tmp/site || exit 3
libs=$(python3 -c "import glob,os,sys; print(':'.join(sorted({os.path.dirname(p) for p in glob.glob(os.path.join(sys.prefix,'lib/python3*/site-packages/nvidia/**/lib*.so*'), recursive=True)})))")
export LD_LIBRARY_PATH="${libs}:${LD_LIBRARY_PATH:-}"
for i in $(seq 1 120); do grep -q "MAKE DONE" /tmp/make.log && break; sleep 2; done
cat /tmp/make.log | grep -v "Loading weights" | tail -20
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cd /tmp/repo
for d in m1 m32; do
  echo "== $d"
  PYTHONPATH=/tmp/site python3 bench/gpu_fp16_latency.py time /tmp/$d --json "$OUTDIR/gpu_$d.json" 2>&1 | grep -v "^$" | tail -12
done
cp /tmp/make.log "$OUTDIR/make.log"
