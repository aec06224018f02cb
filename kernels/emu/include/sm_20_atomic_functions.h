// Emulator stub for <sm_20_atomic_functions.h>: everything lives in cuda_emu.h.
#pragma once
#include "../cuda_emu.h"
