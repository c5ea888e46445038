# Sourced by the GPU session scripts: install the checkout the way pip lays it out, without network.
# Wheels of packages the GPU machine lacks (megatron-core, fla-core) may sit in .whl/.
# a fresh copy every call: on a machine kept warm, `cp -r kernels DEST` into an existing DEST would nest the new
# tree inside the old one and run the previous call's kernels
rm -rf /tmp/pkg
mkdir -p "$out" /tmp/pkg/nsa_parallel
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
cp -r nsa_parallel/. /tmp/pkg/nsa_parallel/ && cp -r kernels /tmp/pkg/nsa_parallel/kernels \
  && cp -r context_parallel /tmp/pkg/nsa_parallel/context_parallel
export PYTHONPATH=/tmp/pkg:/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
