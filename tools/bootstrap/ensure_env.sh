#!/usr/bin/env bash
# Installs what the build and tests need when it is missing, and nothing when it is already there:
#   * Debian packages: Bazel 4.2.3 (bazel-bootstrap), Debian's rules_java, googletest sources;
#   * the project's venv at .venv with the pinned tools/bootstrap/requirements.txt;
#   * with --cuda (tools/run_tests.sh passes it), the hermetic CUDA 12 toolchain of --config=cuda
#     builds: Debian's clang-19, and the pinned CUDA wheels of requirements-cuda.txt laid out as
#     one CUDA root in .toolchains/cuda-12.5 (tools/bootstrap/cuda_toolchain.py). No system CUDA.
# Safe to run repeatedly; every entry point (tools/run_main.sh, tools/run_tests.sh) calls it.
set -euo pipefail

with_cuda=0
[[ "${1:-}" == "--cuda" ]] && with_cuda=1

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
requirements="${repo}/tools/bootstrap/requirements.txt"
venv="${repo}/.venv"

log() { echo "[ensure_env] $*" >&2; }

as_root() {
  if [[ "$(id -u)" == 0 ]]; then "$@"; else sudo "$@"; fi
}

apt_packages=()
command -v bazel >/dev/null 2>&1 || apt_packages+=(bazel-bootstrap)
[[ -d /usr/share/bazel/rules/java ]] || apt_packages+=(bazel-rules-java)
[[ -d /usr/src/googletest/googletest ]] || apt_packages+=(googletest libgtest-dev)
if ((with_cuda)); then
  command -v clang++-19 >/dev/null 2>&1 || apt_packages+=(clang-19)
fi
if ((${#apt_packages[@]})); then
  log "installing Debian packages: ${apt_packages[*]}"
  as_root apt-get update -q
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q "${apt_packages[@]}"
fi

# The venv is rebuilt only when the pinned requirements change.
stamp="${venv}/.requirements.sha256"
want="$(sha256sum "${requirements}" | cut -d' ' -f1)"
if [[ ! -x "${venv}/bin/python3" || ! -f "${stamp}" || "$(cat "${stamp}")" != "${want}" ]]; then
  python="${DE_BASE_PYTHON:-python3}"
  log "creating ${venv} with $(${python} --version 2>&1)"
  "${python}" -m venv "${venv}"
  "${venv}/bin/python3" -m pip install -q --disable-pip-version-check -r "${requirements}"
  echo "${want}" > "${stamp}"
fi

if ((with_cuda)); then
  # Reinstalled only when the pins change (the root's version.txt carries their hash).
  cuda_root="${repo}/.toolchains/cuda-12.5"
  before="$(head -1 "${cuda_root}/version.txt" 2>/dev/null || true)"
  "${venv}/bin/python3" "${repo}/tools/bootstrap/cuda_toolchain.py" \
    "${repo}/tools/bootstrap/requirements-cuda.txt" "${cuda_root}"
  if [[ "$(head -1 "${cuda_root}/version.txt")" != "${before}" && -d "${repo}/.bazel" ]]; then
    # An earlier build of this checkout configured CUDA without this root: configure again.
    log "installed the CUDA toolchain in ${cuda_root}; bazel sync --configure"
    (cd "${repo}" && bazel sync --configure >/dev/null 2>&1) || true
  fi
fi
