#!/usr/bin/env bash
# The GPU half of the test suite and the GPU benchmarks, on the H200 with a runtime-only TVM.
# Run from the repo root on the GPU machine, carrying .device-site (../shared/tools/device-site) and
# .gpu/artifacts.tar.xz (python -m bench.build_gpu_artifacts):   bash bench/gpu_suite.sh STAGE...
# Stages: setup tests floors exec worker wexec parts inputcopy isolation isopin isocpu controller ctlbusy hotpath nbcheck notebooks experiments. Results land in bench/results/ (and $OUT when set).
set -uo pipefail
export PYTHONPATH=$PWD/.device-site:$PWD TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
# polars (.whl, 52 MiB) does not fit in one carry with TVM: a first call carries it alone; the notebook stack
# (.whl-nb, 26 MiB: python -m bench.build_nb_wheels) travels with TVM. Wheels present are installed into
# .gpu/site once per set (stamp); .gpu/site stays while the machine is warm
wheels=$(ls .whl/*.whl .whl-nb/*.whl 2>/dev/null)
stamp=.gpu/site/.installed-$(echo $wheels | md5sum | cut -c1-12)
[ -n "$wheels" ] && [ ! -f $stamp ] && python3 -m pip install -q --no-index --no-deps --upgrade --target .gpu/site $wheels && touch $stamp
# nbconvert's templates live in share/jupyter; ipykernel's kernel.json there names a bare `python`: drop it, so
# the python3 kernel is this interpreter (jupyter_client's fallback)
rm -rf .gpu/site/share/jupyter/kernels
[ -d .gpu/site ] && export PYTHONPATH=$PYTHONPATH:$PWD/.gpu/site JUPYTER_PATH=$PWD/.gpu/site/share/jupyter
# the charts' Vega bundle built here (vl-convert is 21 MiB: not carried): carry .gpu/ui-cache
[ -d .gpu/ui-cache/ui ] && export WORKBENCH_CACHE=$PWD/.gpu/ui-cache
export WORKBENCH_CUBIN_CACHE=$PWD/.gpu/cubin WORKBENCH_GPU_ARTIFACTS=$PWD/.gpu/artifacts
OUT=${OUT:-$PWD/.gpu/out}; mkdir -p "$OUT" .gpu/cubin
# kernels compiled by NVRTC on an earlier machine (fetched from $OUT/cubin.tar and carried as .gpu/cubin-carry)
[ -d .gpu/cubin-carry/cubin ] && cp -rn .gpu/cubin-carry/cubin/. .gpu/cubin/
PY=python3
GPU_TESTS="tests/test_env_gpu.py tests/test_models_gpu.py tests/test_worker_cuda.py"
GPU_TESTS="$GPU_TESTS tests/test_isolation_gpu.py tests/test_ui_gpu.py tests/test_controller_gpu.py tests/test_models_tensorcore.py"
# the no-GPU paths, run in children that see no CUDA device: they must hold on the H200 too
NOGPU_TESTS="tests/test_env_floors.py::test_gpu_part_names_why_it_is_missing tests/test_models_cubin.py::test_no_device_gives_a_clear_error"
NOGPU_TESTS="$NOGPU_TESTS tests/test_models_cubin.py::test_fp16_sources_compile_with_the_cuda_headers"
NOGPU_TESTS="$NOGPU_TESTS tests/test_worker_cuda.py::test_imports_without_a_gpu_and_fails_clearly"
NOGPU_TESTS="$NOGPU_TESTS tests/test_worker_process.py::test_a_child_that_cannot_start_fails_clearly"
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    setup)  [ -d .gpu/artifacts/mlp_cuda ] || $PY -c "from workbench.models.artifact import unpack_bundle as u; print(u('.gpu/artifacts.tar.xz', '.gpu/artifacts'))"
            $PY -c "from pathlib import Path; from workbench.models.artifact import Artifact; from workbench.models import cubin_cache as c
for d in sorted(Path('.gpu/artifacts').glob('*_cuda')): print(d.name, c.precompile_artifact(Artifact.open(d), workers=16), 'kernels', flush=True)" ;;
    tests)  { $PY -m pytest -m gpu -p no:cacheprovider -q -rs $GPU_TESTS; $PY -m pytest -p no:cacheprovider -q -rs $NOGPU_TESTS; } 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
    floors) $PY -m bench.floors ;;
    exec)   $PY -m bench.exec_latency --artifacts .gpu/artifacts.tar.xz ${EXEC_ARGS:-} ;;
    worker) $PY -m bench.worker_load; $PY -m bench.worker_exec --device cuda; $PY -m bench.worker_emulated_vs_real ;;
    wexec)  $PY -m bench.worker_exec --device cuda ${WEXEC_ARGS:-} ;;
    parts)  $PY -m bench.worker_parts --device cuda ${PARTS_ARGS:-} ;;
    inputcopy) $PY -m bench.input_copy ;;
    isolation) $PY -m bench.isolation --device cuda ;;
    isopin) $PY -m bench.isolation --device cuda --worker-cpus 8-11 --session-cpus 0-7 --name isolation_pinned ;;
    isocpu) $PY -m bench.isolation --device cpu --artifacts .gpu/artifacts --name isolation_cpu_h200
            $PY -m bench.isolation --device cpu --artifacts .gpu/artifacts --worker-cpus 8 --session-cpus 0-7 \
                --name isolation_cpu_h200_pinned ;;
    controller) $PY -m bench.controller_gpu --seconds ${CTL_SECONDS:-15} ;;
    hotpath) $PY -m bench.telemetry_hot_path --device cuda ${HOT_ARGS:-} ;;
    ctlbusy) $PY -m bench.controller_gpu --seconds ${CTL_SECONDS:-10} --policies clockwork --no-emulated \
                --conditions idle,thread+pump --name controller_gpu_busy ${CTL_ARGS:-} ;;
    nbcheck) $PY -m bench.notebooks_gpu --check ;;
    notebooks) $PY -m bench.notebooks_gpu --out .gpu/notebooks ${NB_ARGS:-}
            tar czf "$OUT/notebooks_h200.tgz" -C .gpu notebooks ;;
    experiments) for e in fig5_h200 fig6_h200 fig9_h200; do $PY -m workbench run experiments/$e.toml --out .gpu/exp/$e --no-report; done
            tar czf "$OUT/experiments_h200.tgz" -C .gpu/exp . ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
tar czf "$OUT/results.tgz" bench/results
tar cf "$OUT/cubin.tar" -C .gpu cubin
