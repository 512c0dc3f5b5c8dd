// framegraph_lite_convert: ONNX -> MindSpore Lite model (.ms), fp32, inputs kept NCHW.
//
//   framegraph_lite_convert MODEL.onnx OUTPUT_PREFIX      (writes OUTPUT_PREFIX.ms)
//
// Lite 2.0 ships no header for mindspore::Converter; the declaration below matches the symbols that
// libmindspore_converter.so exports (nm -DC): one std::shared_ptr member, strings passed as std::vector<char>.
// On success the tool prints "FRAMEGRAPH_CONVERT_OK <path>" and leaves through _exit(0): a process that ran the
// converter crashes in its static destructors (ThreadPoolReuseManager), so it never returns from main.
// Build: g++ -O2 -std=c++17 -D_GLIBCXX_USE_CXX11_ABI=0 -I<root> -I<root>/include framegraph_lite_convert.cc
//        -L<lib> -lmindspore_converter -Wl,-rpath,<lib> -o framegraph_lite_convert
#include <unistd.h>

#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "include/api/format.h"
#include "include/api/status.h"
#include "include/api/types.h"
#include "include/registry/converter_context.h"

namespace mindspore {
struct ConverterPara;
class Converter {
 public:
  Converter();
  ~Converter() = default;
  void SetInputFormat(Format format);
  void SetSaveType(ModelType save_type);
  void SetWeightFp16(bool weight_fp16);
  Status Convert(converter::FmkType fmk_type, const std::vector<char> &model_file,
                 const std::vector<char> &output_file, const std::vector<char> &weight_file);

 private:
  std::shared_ptr<ConverterPara> data_;
};
}  // namespace mindspore

static std::vector<char> chars(const std::string &s) { return std::vector<char>(s.begin(), s.end()); }

int main(int argc, char **argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s MODEL.onnx OUTPUT_PREFIX  (writes OUTPUT_PREFIX.ms)\n", argv[0]);
    return 2;
  }
  int code = 1;
  try {
    mindspore::Converter converter;
    converter.SetInputFormat(mindspore::NCHW);
    converter.SetSaveType(mindspore::kMindIR_Lite);
    converter.SetWeightFp16(false);
    mindspore::Status status =
        converter.Convert(mindspore::converter::kFmkTypeOnnx, chars(argv[1]), chars(argv[2]), chars(""));
    if (status.IsOk()) {
      std::printf("FRAMEGRAPH_CONVERT_OK %s.ms\n", argv[2]);
      code = 0;
    } else {
      std::fprintf(stderr, "FRAMEGRAPH_CONVERT_FAILED %s\n", status.ToString().c_str());
    }
  } catch (const std::exception &e) {
    std::fprintf(stderr, "FRAMEGRAPH_CONVERT_FAILED C++ exception: %s\n", e.what());
  } catch (...) {
    std::fprintf(stderr, "FRAMEGRAPH_CONVERT_FAILED unknown C++ exception\n");
  }
  std::fflush(stdout);
  std::fflush(stderr);
  _exit(code);
}
