# Sourced by the GPU scripts: puts the CUDA libraries of the machine's NVIDIA wheels on the
# library path (they sit in nvidia/<component>/lib, CUDA 12 style, or nvidia/cu13/lib), sets
# $nv to the wheels' folder and $bin to the carried worker, and prints the GPU and PyTorch.
bin=./.gpu/lockstep-worker
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
nv=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]) + '/nvidia')" 2>/dev/null)
for d in "$nv"/*/lib; do LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
export LD_LIBRARY_PATH
ls "$nv"/*/lib 2>/dev/null | grep -E 'libcublas\.|libnvrtc\.|libnccl' | tr '\n' ' '; echo
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
