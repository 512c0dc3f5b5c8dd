// framegraph_lite: a C interface over the MindSpore Lite 2.0 C++ API (mindspore::Model), for ctypes.
//
// Rules: every function catches all exceptions; a failing call returns -1 (or NULL) and leaves its message in
// fg_lite_last_error() (per thread). Tensors are addressed by (is_output, index); dtype codes are
// mindspore::DataType values. Build (old C++ ABI, as the Lite libraries):
//   g++ -O2 -shared -fPIC -std=c++17 -D_GLIBCXX_USE_CXX11_ABI=0 -I<root> -I<root>/include framegraph_lite.cc
//       -L<lib> -lmindspore-extendrt_python -Wl,-rpath,<lib> -o libframegraph_lite.so
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "include/api/context.h"
#include "include/api/model.h"
#include "include/api/status.h"
#include "include/api/types.h"

namespace {
thread_local std::string g_error;

int fail(const std::string &message) {
  g_error = message;
  return -1;
}

int fail_current(const char *where) {
  try {
    throw;
  } catch (const std::exception &e) {
    return fail(std::string(where) + ": " + e.what());
  } catch (...) {
    return fail(std::string(where) + ": unknown C++ exception");
  }
}
}  // namespace

struct fg_lite_model {
  mindspore::Model model;
  std::vector<mindspore::MSTensor> inputs;
  std::vector<mindspore::MSTensor> outputs;
};

namespace {
mindspore::MSTensor *tensor_at(fg_lite_model *m, int is_output, int index) {
  if (m == nullptr) {
    fail("no model (NULL handle)");
    return nullptr;
  }
  auto &tensors = is_output ? m->outputs : m->inputs;
  if (index < 0 || static_cast<size_t>(index) >= tensors.size()) {
    fail(std::string(is_output ? "output" : "input") + " index " + std::to_string(index) + " out of range (model has " +
         std::to_string(tensors.size()) + ")");
    return nullptr;
  }
  return &tensors[index];
}
}  // namespace

extern "C" {

const char *fg_lite_last_error(void) { return g_error.c_str(); }

// A model built from a MindSpore Lite file (.ms, kMindIR_Lite) on the CPU with num_threads threads (<= 0: Lite's
// default); NULL on failure.
fg_lite_model *fg_lite_create(const char *path, int num_threads) {
  try {
    if (path == nullptr) {
      fail("no model path (NULL)");
      return nullptr;
    }
    auto context = std::make_shared<mindspore::Context>();
    if (num_threads > 0) context->SetThreadNum(num_threads);
    context->MutableDeviceInfo().push_back(std::make_shared<mindspore::CPUDeviceInfo>());
    auto m = std::make_unique<fg_lite_model>();
    mindspore::Status status = m->model.Build(std::string(path), mindspore::kMindIR_Lite, context);
    if (!status.IsOk()) {
      fail("building the MindSpore Lite model " + std::string(path) + " failed: " + status.ToString());
      return nullptr;
    }
    m->inputs = m->model.GetInputs();
    m->outputs = m->model.GetOutputs();
    return m.release();
  } catch (...) {
    fail_current("fg_lite_create");
    return nullptr;
  }
}

void fg_lite_free(fg_lite_model *m) {
  try {
    delete m;
  } catch (...) {
  }
}

int fg_lite_num_tensors(fg_lite_model *m, int is_output) {
  if (m == nullptr) return fail("no model (NULL handle)");
  return static_cast<int>(is_output ? m->outputs.size() : m->inputs.size());
}

// The tensor's name copied into buf (NUL-terminated, cut to size); returns the name's full length.
int fg_lite_tensor_name(fg_lite_model *m, int is_output, int index, char *buf, size_t size) {
  try {
    auto *t = tensor_at(m, is_output, index);
    if (t == nullptr) return -1;
    std::string name = t->Name();
    if (size > 0) {
      size_t n = name.size() < size - 1 ? name.size() : size - 1;
      std::memcpy(buf, name.data(), n);
      buf[n] = '\0';
    }
    return static_cast<int>(name.size());
  } catch (...) {
    return fail_current("fg_lite_tensor_name");
  }
}

int fg_lite_tensor_dtype(fg_lite_model *m, int is_output, int index) {
  try {
    auto *t = tensor_at(m, is_output, index);
    return t == nullptr ? -1 : static_cast<int>(t->DataType());
  } catch (...) {
    return fail_current("fg_lite_tensor_dtype");
  }
}

// Copies up to cap dimensions into dims; returns the rank.
int fg_lite_tensor_shape(fg_lite_model *m, int is_output, int index, int64_t *dims, int cap) {
  try {
    auto *t = tensor_at(m, is_output, index);
    if (t == nullptr) return -1;
    const std::vector<int64_t> &shape = t->Shape();
    for (size_t i = 0; i < shape.size() && static_cast<int>(i) < cap; ++i) dims[i] = shape[i];
    return static_cast<int>(shape.size());
  } catch (...) {
    return fail_current("fg_lite_tensor_shape");
  }
}

int64_t fg_lite_tensor_nbytes(fg_lite_model *m, int is_output, int index) {
  try {
    auto *t = tensor_at(m, is_output, index);
    return t == nullptr ? -1 : static_cast<int64_t>(t->DataSize());
  } catch (...) {
    return fail_current("fg_lite_tensor_nbytes");
  }
}

// Copies nbytes from data into input index; nbytes must equal the tensor's byte size.
int fg_lite_set_input(fg_lite_model *m, int index, const void *data, size_t nbytes) {
  try {
    auto *t = tensor_at(m, 0, index);
    if (t == nullptr) return -1;
    size_t want = t->DataSize();
    if (nbytes != want)
      return fail("input " + t->Name() + " takes " + std::to_string(want) + " bytes, got " + std::to_string(nbytes));
    void *dst = t->MutableData();
    if (dst == nullptr) return fail("input " + t->Name() + ": MindSpore Lite gave no buffer");
    std::memcpy(dst, data, nbytes);
    return 0;
  } catch (...) {
    return fail_current("fg_lite_set_input");
  }
}

int fg_lite_predict(fg_lite_model *m) {
  try {
    if (m == nullptr) return fail("no model (NULL handle)");
    std::vector<mindspore::MSTensor> outputs;
    mindspore::Status status = m->model.Predict(m->inputs, &outputs);
    if (!status.IsOk()) return fail("MindSpore Lite predict failed: " + status.ToString());
    if (outputs.size() != m->outputs.size())
      return fail("MindSpore Lite predict gave " + std::to_string(outputs.size()) + " outputs, the model declares " +
                  std::to_string(m->outputs.size()));
    m->outputs = outputs;
    return 0;
  } catch (...) {
    return fail_current("fg_lite_predict");
  }
}

// Copies output index into buf; nbytes must equal the tensor's byte size.
int fg_lite_get_output(fg_lite_model *m, int index, void *buf, size_t nbytes) {
  try {
    auto *t = tensor_at(m, 1, index);
    if (t == nullptr) return -1;
    size_t have = t->DataSize();
    if (nbytes != have)
      return fail("output " + t->Name() + " holds " + std::to_string(have) + " bytes, the buffer has " +
                  std::to_string(nbytes));
    std::shared_ptr<const void> data = t->Data();
    if (data == nullptr) return fail("output " + t->Name() + " has no data (run predict first)");
    std::memcpy(buf, data.get(), nbytes);
    return 0;
  } catch (...) {
    return fail_current("fg_lite_get_output");
  }
}

}  // extern "C"
