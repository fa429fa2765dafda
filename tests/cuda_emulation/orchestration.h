// The whole-edge and node ops' orchestration (csrc/darts_edge.cpp,
// csrc/partial_channel_node.cpp) compiled into the emulation, so that it runs
// on CPU tensors exactly as it runs on a GPU: where it asks (host_loops())
// whether to take a host loop instead of the ATen ops a GPU runs, here the
// answer is no (the CPU tensors stand for CUDA ones). Its CUDA registration
// (csrc/cuda/darts_edge.cu) becomes the emulated kernels'; its Autograd kernels
// stay fastnas._C's, which call the op through the dispatcher.
//
// Include this, then the orchestration's .cpp; every header they include must
// be included here first, so that the macros below reach their code only.
#pragma once

#define FASTNAS_CUDA_EMULATION
// darts_edge.h's host_loops(): no, the CPU tensors stand for device ones.
#define FASTNAS_EMULATE_DEVICE_PATHS
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "checks.h"
#include "cuda/common.cuh"
#include "darts_edge.h"
#include "fastnas_math.h"

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) FASTNAS_EMU_##key##_IMPL(m)
#define FASTNAS_EMU_CUDA_IMPL(m) FASTNAS_CUDA_LIBRARY_IMPL(m)
#define FASTNAS_EMU_Autograd_IMPL(m) \
  [[maybe_unused]] static void C10_CONCATENATE(fastnas_emu_unused_, C10_UID)(torch::Library & m)
