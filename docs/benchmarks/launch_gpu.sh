# Two GPUs (device tool), .whl carried: source docs/benchmarks/gpu_setup.sh && OUT=DIR bash docs/benchmarks/launch_gpu.sh
# Issue 4, LASP-2 bound by its host at 32k tokens per GPU (twenty-fourth session): kernels/launch.py launches
# Triton's compiled kernels directly once a launch's specialisation is known. 1. the installed Triton's launch
# code (what Launch relies on: CompiledKernel.__getitem__ takes every parameter, constexprs included);
# 2. the GPU tests of every kernel family and of sequence parallelism on NCCL (bf16 against float64; their
# repeated launches go through the compiled kernels); 3. host microseconds per launch
# (triton_launch_host_gpu.py: `Tuned.run` is now the direct path, `JITFunction.run` Triton's); 4. LASP-2's
# host by piece and its steady-state step against its GPU compute.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
python3 - > "$OUT/triton_launch_source.txt" 2>&1 <<'PY'
import inspect, triton
from triton.compiler.compiler import CompiledKernel
from triton.runtime.jit import JITFunction
from triton.runtime.autotuner import Autotuner
print(triton.__version__)
print(inspect.getsource(CompiledKernel.__getitem__))
print(inspect.getsource(JITFunction.run)[-2200:])
print(inspect.getsource(Autotuner.run)[-900:])
PY
head -c 400 "$OUT/triton_launch_source.txt"
SEQPAR_FLASH_TUNE=0 timeout 300 python3 -m pytest -q -m gpu tests/test_lightning_triton.py tests/test_flash_triton.py \
    tests/test_fused_triton.py tests/test_kernels.py tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $?"; tail -3 "$OUT/gpu_tests.log"
timeout 60 python3 docs/benchmarks/triton_launch_host_gpu.py "$OUT/launch.json" > "$OUT/launch.log" 2>&1
echo "launch: exit $?"; tail -14 "$OUT/launch.log"
timeout 100 torchrun --standalone --nproc_per_node 2 docs/benchmarks/lasp_host_parts_gpu.py "$OUT/host_parts.json" 32768 \
    > "$OUT/host_parts.log" 2>&1
echo "host parts: exit $?"; grep "host" "$OUT/host_parts.log" | grep -v Warn | cut -c1-400
timeout 150 torchrun --standalone --nproc_per_node 2 docs/benchmarks/lasp_steady_gpu.py "$OUT/steady.json" 32768 3 \
    > "$OUT/steady.log" 2>&1
echo "steady: exit $?"; grep -E "ms per rank|compute|kernel alone" "$OUT/steady.log" | cut -c1-250
