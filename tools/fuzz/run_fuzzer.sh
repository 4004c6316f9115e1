#!/usr/bin/env bash
# Builds the kernel library's libFuzzer target (embedding/kernels/fuzz/lookup_fuzzer.cc) with
# clang, AddressSanitizer and UBSan, and fuzzes for SECONDS (default 60) from the seed corpus.
# New corpus entries go to a scratch directory, never into the repository. Installs clang from
# Debian's packages when it is missing. Writes a one-case JUnit XML to XML_OUT when given.
#   tools/fuzz/run_fuzzer.sh [SECONDS] [XML_OUT]
set -euo pipefail
seconds="${1:-60}"
xml_out="${2:-}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

if ! command -v clang++ >/dev/null 2>&1 || ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  echo "[fuzz] installing clang and its sanitizer runtimes" >&2
  if [[ "$(id -u)" == 0 ]]; then sudo=""; else sudo="sudo"; fi
  ${sudo} apt-get update -q
  DEBIAN_FRONTEND=noninteractive ${sudo} apt-get install -y -q clang libclang-rt-14-dev
fi

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
kernels="${repo}/embedding/kernels"
clang++ -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
  -I"${repo}" "${kernels}/fuzz/lookup_fuzzer.cc" "${kernels}/embedding_lookup_cpu.cc" \
  "${kernels}/embedding_lookup_cpu_double.cc" "${kernels}/embedding_lookup_half_cpu.cc" \
  "${kernels}/input_errors.cc" "${kernels}/integer_lookup_cpu.cc" -o "${work}/lookup_fuzzer"
mkdir -p "${work}/corpus"
start=$(date +%s)
status=0
"${work}/lookup_fuzzer" -max_total_time="${seconds}" -print_final_stats=1 \
  -artifact_prefix="${work}/" "${work}/corpus" "${kernels}/fuzz/corpus" 2>"${work}/log" || status=$?
grep -E "^stat::number_of_executed_units|^stat::new_units_added|^#[0-9]+.*DONE" "${work}/log" >&2 || true
elapsed=$(( $(date +%s) - start ))
if [[ ${status} != 0 ]]; then
  tail -n 40 "${work}/log" >&2
  mkdir -p "${repo}/.fuzz-findings" && cp "${work}"/crash-* "${work}"/leak-* "${repo}/.fuzz-findings/" 2>/dev/null || true
fi
if [[ -n "${xml_out}" ]]; then
  execs=$(grep -oP "^stat::number_of_executed_units:\s*\K[0-9]+" "${work}/log" || echo 0)
  failure=""
  [[ ${status} == 0 ]] || failure="<failure message=\"fuzzer finding (exit ${status})\"/>"
  cat > "${xml_out}" <<XML
<?xml version="1.0" encoding="UTF-8"?>
<testsuites><testsuite name="lookup_fuzzer" tests="1">
<testcase classname="lookup_fuzzer" name="fuzz_${seconds}s_${execs}_executions" time="${elapsed}">${failure}</testcase>
</testsuite></testsuites>
XML
fi
exit ${status}
