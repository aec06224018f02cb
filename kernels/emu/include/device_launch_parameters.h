// Emulator stub for <device_launch_parameters.h>: everything lives in cuda_emu.h.
#pragma once
#include "../cuda_emu.h"
