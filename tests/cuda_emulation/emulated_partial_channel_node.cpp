// The PC-DARTS node's orchestration, compiled for the host emulation (see
// orchestration.h); its CUDA registration is in emulated_darts_edge.cpp.
#include "orchestration.h"
#include "partial_channel_node.cpp"
