// Emulator stub for <cuda_runtime_api.h>: everything lives in cuda_emu.h.
#pragma once
#include "../cuda_emu.h"
