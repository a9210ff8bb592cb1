# The wheels the GPU machine's image lacks, fetched here into .whl/ (git-excluded; carried to the
# device and installed by gpu_setup.sh): hydra for the CLI, DeepSpeed for parallel.dp_engine=deepspeed
# (pure Python, DS_BUILD_OPS=0) and what it needs, fla for the lightning-attention anchor of
# `python -m seqpar.bench kernels`. The image has einops and transformers, which fla needs.
#   bash docs/benchmarks/wheels.sh
set -e
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    hydra-core==1.3.8 omegaconf==2.3.1 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 fla-core==0.6.0 flash-linear-attention==0.6.0
# published as source only: built here into pure-Python wheels (DeepSpeed without its C++/CUDA ops)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 deepspeed==0.19.8
ls .whl
