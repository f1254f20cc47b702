// Typed handles of the library's registered ops, for C++ code that calls them through the
// dispatcher (autograd.cpp, python.cpp).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>

namespace crvae_ext_cpp {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Groupsort = at::Tensor(const at::Tensor&, int64_t, int64_t);

}  // namespace crvae_ext_cpp
