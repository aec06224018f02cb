// nvcuda::wmma emulation (part of cuda_emu.h; include that instead). Not implemented yet:
// kernels that include <mma.h> compile, but using a fragment is a compile error.
#pragma once
namespace nvcuda {
namespace wmma {}
}  // namespace nvcuda
