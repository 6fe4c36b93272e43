// The last CUDA launch error, from the nvcc-compiled side (no torch headers there).
#pragma once

namespace torchutils_ext {
namespace cuda {
const char* last_launch_error();  // nullptr when the last launch succeeded (clears the error)
}  // namespace cuda
}  // namespace torchutils_ext
