#!/usr/bin/env bash
# One call on the GPU machine: install the carried wheel, then run the named phases (default:
# tests encrypted remote). Carry `.device` holding:
#   tensorizer_rs-*.whl (a release build; the golden vectors come from tests/vectors),
#   cw/*.whl (CoreWeave tensorizer 2.12.1 and its pure-Python dependencies, for side-by-side runs),
#   bin/nginx and bin/s3s-fs (servers for the remote benchmark; check `ldd` first),
#   bin/range_client (optional: `cc -O2 -pthread -static -o .device/bin/range_client
#   bench/range_client.c`, the bare client's ceilings into fresh and reused memory).
#   device run: bash bench/on_device.sh [tests] [encrypted] [remote] [gpu]   (logs under $OUT)
# Phases:
#   tests      the GPU test suite, vectors and encryption tests on CUDA
#   encrypted  bench/bench_encrypted.py (plain vs encrypted, CPU and CUDA, one core)
#   remote     bench/bench_remote.py (HTTP(S) via nginx, S3 via s3s-fs; ours vs CoreWeave vs curl;
#              REMOTE_GIB, REMOTE_ARGS, e.g. --variants JSON for A/B runs)
#   cpu        bench/bench_cpu.py (page cache -> CPU tensors; huge-page A/B)
#   gpu        bench/gpu_bench.py warm only (incl. the vLLM loader path), no sweep/small/cold;
#              GPU_ARGS, e.g. --ab
#   decrypt    tests/gpu/test_gpu_decrypt.py: the GPU decryption kernels alone (NVRTC from torch's
#              wheels; every encrypted vector, tampering, wrong keys, kernel GB/s), and
#              tests/gpu/test_gpu_decrypt_load.py: encrypted loads through the pipeline, opened
#              on the GPU (vectors, layouts, in place, tampering, two threads, host fallback)
#   gpuenc     bench/gpu_bench.py --encrypted: plaintext vs encrypted, new tensors and in place,
#              each load a fresh process with its bytes checked after the clock: warm (host
#              decryption beside for reference), HTTP to CUDA (nginx from the page cache, when
#              .device/bin/nginx was carried) and cold (caches dropped before each load);
#              ENC_ROUNDS (3) interleaved rounds (cold: 2) of ENC_GIB (8) GiB (the size:
#              ENC_GIB=16); ENC_ARGS for more (e.g. --skip-cold); per row the encrypted/plaintext
#              ratio and RssAnon growth last. About 6 minutes at 8 GiB; --budget 480 skips loads
#              that would not fit the call, so the summary always prints.
#   ab         this wheel ("after") against .device/old/*.whl ("before"), each load a fresh process:
#              warm new tensors, in place, the vLLM loader's path, an encrypted file, HTTP to
#              CUDA (when .device/bin/nginx was carried), cold; AB_ROUNDS (3) interleaved rounds,
#              AB_GIB (8) GiB; a comparison table last, bench.json and gpu-ab.log under $OUT.
#              Fits one call (about 6 minutes on a 16-CPU H100 or H200 host).
#   peers      bench/peers_bench.py: us beside InstantTensor, fastsafetensors, Run:ai, CoreWeave and
#              safetensors; page cache, tmpfs, cold (~9 min; needs .device/peers and .device/cw from
#              scripts/fetch-device-wheels.sh; PEERS_ARGS, e.g. "--gib 16 --columns page,tmpfs";
#              the O_DIRECT probes by C threads too with .device/bin/direct_reader, see disk;
#              "--probes ceiling" for cold A/Bs: one probe between rounds, ~3 s instead of ~55)
#   disk       bench/disk_probe.py: the cold disk's ceiling by request pattern (O_DIRECT and buffered,
#              threads x request size; O_DIRECT by C threads too with .device/bin/direct_reader,
#              `cc -O2 -pthread -static -o .device/bin/direct_reader bench/direct_reader.c`) and
#              our cold loads beside it (~3 min; DISK_GIB, DISK_ARGS, e.g. "--only-direct")
#   hybrid     bench/hybrid_probe.py: a staged load from the page cache alone, page-cache pages
#              registered and copied alone, and the two at once (~2 min; HYBRID_ARGS)
#   trace      bench/trace_gpu_load.py: a load's timeline from the loader's marks (TRACE_ARGS, e.g.
#              "--gib 8 --fresh new --rounds 4": fresh processes timed as gpu_bench times them;
#              add "--cold --c-reader .device/bin/direct_reader" for cold loads beside C reads)
#   tp         bench/tp_bench.py: N ranks load their shards at once (N = the GPUs, or 4 sharing one);
#              ~8 min; TP_ARGS, e.g. "--ranks 2 --rows page,cold"
#   Each of ab / peers / tp fills a call; run it alone. peers and tp write peers.* / tp.* (json,
#   log, png if matplotlib is there) under $OUT and print their table last.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
phases=${*:-tests encrypted remote}
# --upgrade throughout: without it pip keeps a package already in the target (a warm machine, or
# a second install in one call) and only warns, and the run measures the earlier wheel.
python3 -m pip install -q --upgrade --no-index --no-deps --target "$HOME/site" .device/tensorizer_rs-*.whl || exit 1
sha256sum .device/tensorizer_rs-*.whl | cut -c1-16 | sed "s/^/wheel sha256 /" | tee "$OUT/wheel.txt"
if [ -d .device/cw ]; then
  python3 -m pip install -q --upgrade --no-index --no-deps --target "$HOME/cw" .device/cw/*.whl || exit 1
fi
export PYTHONPATH=$HOME/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"
# The checkout there may carry a stale git HEAD: pass BENCH_COMMIT=<commit here> with the call.
echo "${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null) (HEAD of the device checkout)}" | tee "$OUT/commit.txt"
for phase in $phases; do
  echo "=== $phase ($(date +%T))"
  case $phase in
    tests)
      timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_vectors.py \
        tests/test_encryption.py -k "not crosscheck and not coreweave" 2>&1 | tee "$OUT/gpu-tests.log" | tail -15 ;;
    encrypted)
      timeout 300 python3 bench/bench_encrypted.py --dir /tmp/tzbench --gib "${GIB:-6}" 2>&1 | tee "$OUT/bench-encrypted.log"
      rm -rf /tmp/tzbench ;;
    remote)
      chmod +x .device/bin/* 2>/dev/null
      client=(); [ -x .device/bin/range_client ] && client=(--client .device/bin/range_client)
      timeout 540 python3 bench/bench_remote.py --dir /tmp/tzremote --gib "${REMOTE_GIB:-2}" \
        --nginx .device/bin/nginx --s3s .device/bin/s3s-fs --coreweave "$HOME/cw" --out "$OUT" \
        --tls "${TLS_DIR:-.device/tls}" "${client[@]}" ${REMOTE_ARGS:-} 2>&1 \
        | tee "$OUT/bench-remote.log" | grep -v '^{'
      rm -rf /tmp/tzremote ;;
    cpu)
      timeout 300 python3 bench/bench_cpu.py --dir /tmp/tzcpu --gib "${CPU_GIB:-4}" --coreweave "$HOME/cw" ${CPU_ARGS:-} 2>&1 | tee "$OUT/bench-cpu.log" | tail -12
      rm -rf /tmp/tzcpu ;;
    gpu)
      timeout 420 python3 bench/gpu_bench.py --dir /tmp/tzgpu --out "$OUT" --skip-cold --skip-sweep \
        --skip-small --skip-safetensors --coreweave "$HOME/cw" ${GPU_ARGS:-} 2>&1 | tee "$OUT/gpu-bench.log" | tail -30 ;;
    decrypt)
      timeout 300 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu/test_gpu_decrypt.py \
        tests/gpu/test_gpu_decrypt_load.py 2>&1 \
        | tee "$OUT/gpu-decrypt.log" | grep -E "kernels:|GPU decrypt|passed|failed|error|Error" | tail -20 ;;
    gpuenc)
      chmod +x .device/bin/* 2>/dev/null
      nginx=(); [ -x .device/bin/nginx ] && nginx=(--nginx "$PWD/.device/bin/nginx")
      # shellcheck disable=SC2086
      timeout 540 python3 bench/gpu_bench.py --encrypted --dir /tmp/tzenc --out "$OUT" \
        --gib "${ENC_GIB:-8}" --rounds "${ENC_ROUNDS:-3}" --budget 480 "${nginx[@]}" ${ENC_ARGS:-} \
        2>&1 | tee "$OUT/gpu-enc.log" | tail -14
      rm -rf /tmp/tzenc ;;
    ab)
      python3 -m pip install -q --upgrade --no-index --no-deps --target "$HOME/site_old" .device/old/*.whl || exit 1
      chmod +x .device/bin/* 2>/dev/null
      nginx=(); [ -x .device/bin/nginx ] && nginx=(--nginx "$PWD/.device/bin/nginx")
      timeout "${AB_TIMEOUT:-540}" python3 bench/gpu_bench.py --dir /tmp/tzab --out "$OUT" \
        --gib "${AB_GIB:-8}" --rounds "${AB_ROUNDS:-3}" \
        --wheels before="$HOME/site_old" after="$HOME/site" "${nginx[@]}" 2>&1 \
        | tee "$OUT/gpu-ab.log" | grep -vE "^(wrote|pinned H2D|staged cap|curl)" | tail -16
      rm -rf /tmp/tzab ;;
    peers)
      if [ -d .device/peers ]; then
        python3 -m pip install -q --upgrade --no-index --no-deps --target "$HOME/peers" .device/peers/*.whl || exit 1
      fi
      # shellcheck disable=SC2086
      creader=(); [ -x .device/bin/direct_reader ] && creader=(--c-reader "$PWD/.device/bin/direct_reader")
      timeout 560 python3 bench/peers_bench.py --dir /tmp/tzpeers --out "$OUT" --coreweave "$HOME/cw" \
        --peers "$HOME/peers" "${creader[@]}" ${PEERS_ARGS:-}
      rm -rf /tmp/tzpeers /dev/shm/tzpeers-* ;;
    hybrid)
      # shellcheck disable=SC2086
      timeout 300 python3 bench/hybrid_probe.py --dir /tmp/tzhybrid --out "$OUT" ${HYBRID_ARGS:-} 2>&1 | tee "$OUT/hybrid-probe.log"
      rm -rf /tmp/tzhybrid ;;
    disk)
      creader=(); [ -x .device/bin/direct_reader ] && creader=(--c-reader "$PWD/.device/bin/direct_reader")
      # shellcheck disable=SC2086
      timeout 300 python3 bench/disk_probe.py --dir /tmp/tzdisk --gib "${DISK_GIB:-6}" --out "$OUT" \
        "${creader[@]}" ${DISK_ARGS:-} 2>&1 | tee "$OUT/disk-probe.log"
      rm -rf /tmp/tzdisk ;;
    trace)
      # shellcheck disable=SC2086
      timeout 300 python3 bench/trace_gpu_load.py /tmp/tztrace/model.tensors ${TRACE_ARGS:---gib 8} 2>&1 | tee "$OUT/trace.log"
      rm -rf /tmp/tztrace ;;
    tp)
      # shellcheck disable=SC2086
      timeout 560 python3 bench/tp_bench.py --dir /tmp/tztp --out "$OUT" --coreweave "$HOME/cw" ${TP_ARGS:-}
      rm -rf /tmp/tztp ;;
    *) echo "unknown phase $phase" ;;
  esac
done
