# Sourced at the start of every device-tool command: installs the carried wheels (made by
# docs/benchmarks/wheels.sh: hydra-core,
# omegaconf, antlr4; see the device README) and seqpar itself, editable, into the machine's venv,
# so that `seqpar.kernels` / `seqpar.launch` resolve exactly as on a user's machine.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
set +e
