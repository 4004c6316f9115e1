// fatbinary: packs cubins and PTX into one CUDA fat binary with NVIDIA's libnvfatbin.
//
// The CUDA 12 wheels on PyPI carry ptxas and libnvfatbin but not NVIDIA's fatbinary tool, so the
// hermetic --config=cuda build (third_party/cuda/cuda.bzl, clang mode) packs what clang and ptxas
// produced for each compute capability with this instead. Clang then embeds the result in the host
// object (-fcuda-include-gpubinary), exactly where nvcc would have put fatbinary's.
//
// Usage: fatbinary --output=FILE [--cubin=SM:FILE]... [--ptx=SM:FILE]...
//   SM is a compute capability without its prefix: 80 for sm_80.

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "nvFatbin.h"

namespace {

struct Image {
  bool ptx = false;
  std::string arch;  // "80"
  std::string path;
  std::string bytes;
};

bool ReadFile(const std::string& path, std::string* bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  bytes->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return true;
}

bool ParseImage(const std::string& value, bool ptx, Image* image) {
  const size_t colon = value.find(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == value.size()) return false;
  image->ptx = ptx;
  image->arch = value.substr(0, colon);
  image->path = value.substr(colon + 1);
  for (char c : image->arch) {
    if (c < '0' || c > '9') return false;
  }
  return true;
}

int Fail(const std::string& message) {
  std::cerr << "fatbinary: " << message << "\n";
  return 1;
}

int Check(nvFatbinResult result, const std::string& what) {
  if (result == NVFATBIN_SUCCESS) return 0;
  return Fail(what + ": " + nvFatbinGetErrorString(result));
}

}  // namespace

int main(int argc, char** argv) {
  std::string output;
  std::vector<Image> images;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    Image image;
    if (arg.rfind("--output=", 0) == 0) {
      output = arg.substr(9);
    } else if (arg.rfind("--cubin=", 0) == 0 && ParseImage(arg.substr(8), false, &image)) {
      images.push_back(image);
    } else if (arg.rfind("--ptx=", 0) == 0 && ParseImage(arg.substr(6), true, &image)) {
      images.push_back(image);
    } else {
      return Fail("unrecognized argument '" + arg +
                  "'; usage: fatbinary --output=FILE [--cubin=SM:FILE]... [--ptx=SM:FILE]...");
    }
  }
  if (output.empty() || images.empty()) {
    return Fail("needs --output and at least one --cubin or --ptx");
  }

  // Linux, 64-bit host code; PTX compressed (libnvfatbin's default, as nvcc's), SASS stored as is.
  const char* options[] = {"-64", "-host=linux"};
  nvFatbinHandle handle = nullptr;
  if (Check(nvFatbinCreate(&handle, options, 2), "nvFatbinCreate")) return 1;
  int rc = 0;
  for (Image& image : images) {
    if (!ReadFile(image.path, &image.bytes)) {
      rc = Fail("cannot read " + image.path);
      break;
    }
    // The identifier names the image in cuobjdump's listing; the file name says enough.
    const std::string name = image.path.substr(image.path.find_last_of('/') + 1);
    if (image.ptx) {
      // libnvfatbin wants the PTX NUL-terminated.
      image.bytes.push_back('\0');
      rc = Check(nvFatbinAddPTX(handle, image.bytes.data(), image.bytes.size(), image.arch.c_str(),
                                name.c_str(), ""),
                 "adding PTX " + image.path + " for sm_" + image.arch);
    } else {
      rc = Check(nvFatbinAddCubin(handle, image.bytes.data(), image.bytes.size(),
                                  image.arch.c_str(), name.c_str()),
                 "adding cubin " + image.path + " for sm_" + image.arch);
    }
    if (rc) break;
  }
  size_t size = 0;
  std::string fatbin;
  if (!rc) rc = Check(nvFatbinSize(handle, &size), "nvFatbinSize");
  if (!rc) {
    fatbin.resize(size);
    rc = Check(nvFatbinGet(handle, fatbin.data()), "nvFatbinGet");
  }
  nvFatbinDestroy(&handle);
  if (rc) return rc;

  std::ofstream out(output, std::ios::binary | std::ios::trunc);
  out.write(fatbin.data(), static_cast<std::streamsize>(fatbin.size()));
  if (!out.flush()) return Fail("cannot write " + output);
  return 0;
}
