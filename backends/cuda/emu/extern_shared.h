// extern_shared.h — include before kernel files that declare
// `extern __shared__ T name[];` (see emu.h): __shared__ becomes empty so the
// block-scope extern names the buffer EMU_DYN_SMEM(T, name) defines.
#include "emu.h"
#undef __shared__
#define __shared__
