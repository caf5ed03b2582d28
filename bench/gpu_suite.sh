#!/usr/bin/env bash
# The GPU half of the test suite and the GPU benchmarks, on the H200 with a runtime-only TVM.
# Run from the repo root on the GPU machine, carrying .device-site (../shared/tools/device-site) and
# .gpu/artifacts.tar.xz (python -m bench.build_gpu_artifacts):   bash bench/gpu_suite.sh STAGE...
# Stages: setup tests floors exec worker wexec isolation experiments. Results land in bench/results/ (and $OUT when set).
set -uo pipefail
export PYTHONPATH=$PWD/.device-site:$PWD TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
# polars does not fit in one carry with TVM: a first call installs its wheels (carried as .whl) into .gpu/site
[ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target .gpu/site .whl/*.whl
[ -d .gpu/site ] && export PYTHONPATH=$PYTHONPATH:$PWD/.gpu/site
export WORKBENCH_CUBIN_CACHE=$PWD/.gpu/cubin WORKBENCH_GPU_ARTIFACTS=$PWD/.gpu/artifacts
OUT=${OUT:-$PWD/.gpu/out}; mkdir -p "$OUT" .gpu/cubin
PY=python3
GPU_TESTS="tests/test_env_gpu.py tests/test_models_gpu.py tests/test_worker_cuda.py"
GPU_TESTS="$GPU_TESTS tests/test_isolation_gpu.py tests/test_ui_gpu.py"
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    setup)  [ -d .gpu/artifacts/mlp_cuda ] || $PY -c "from workbench.models.artifact import unpack_bundle as u; print(u('.gpu/artifacts.tar.xz', '.gpu/artifacts'))"
            $PY -c "from pathlib import Path; from workbench.models.artifact import Artifact; from workbench.models import cubin_cache as c
for d in sorted(Path('.gpu/artifacts').glob('*_cuda')): print(d.name, c.precompile_artifact(Artifact.open(d), workers=16), 'kernels', flush=True)" ;;
    tests)  $PY -m pytest -m gpu -p no:cacheprovider -q -rs $GPU_TESTS 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
    floors) $PY -m bench.floors ;;
    exec)   $PY -m bench.exec_latency --artifacts .gpu/artifacts.tar.xz ${EXEC_ARGS:-} ;;
    worker) $PY -m bench.worker_load; $PY -m bench.worker_exec --device cuda; $PY -m bench.worker_emulated_vs_real ;;
    wexec)  $PY -m bench.worker_exec --device cuda ;;
    isolation) $PY -m bench.isolation --device cuda ;;
    experiments) for e in fig5_h200 fig6_h200 fig9_h200; do $PY -m workbench run experiments/$e.toml --out .gpu/exp/$e --no-report; done
            tar czf "$OUT/experiments_h200.tgz" -C .gpu/exp . ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
tar czf "$OUT/results.tgz" bench/results
