#!/usr/bin/env bash
# The package under the full TensorFlow wheel (tensorflow==2.21.0, the GPU build, which also runs
# on a machine without a GPU) and the CUDA 12 runtime wheel it is used with: the op library built
# with --config=cuda (CPU and GPU kernels; its runtime stub registers them with that libcudart) is
# staged with the Python package, and every test in tests/ runs
# under that TensorFlow with the venv's python (no Bazel), gpu_registration_test first. An
# undefined symbol or an ABI clash fails the first import; the CPU kernels must then behave as
# they do under tensorflow-cpu.
#
#   tools/ci/gpu_tf_suite.sh OUT.xml     # JUnit XML of every case, for summarize_tests.py
#
# The venv (.venv-tfgpu, tools/bootstrap/requirements-gpu-tf.txt) is created when missing or
# when its pins change. Needs `bazel build --config=cuda` to have built the op library.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "${repo}"
out="${1:?usage: gpu_tf_suite.sh OUT.xml}"
requirements="tools/bootstrap/requirements-gpu-tf.txt"
venv="${repo}/.venv-tfgpu"
log() { echo "[gpu_tf_suite] $*" >&2; }

stamp="${venv}/.requirements.sha256"
want="$(sha256sum "${requirements}" | cut -d' ' -f1)"
if [[ ! -x "${venv}/bin/python3" || ! -f "${stamp}" || "$(cat "${stamp}")" != "${want}" ]]; then
  log "creating ${venv}"
  "${DE_BASE_PYTHON:-python3}" -m venv "${venv}" &&
    "${venv}/bin/python3" -m pip install -q --disable-pip-version-check -r "${requirements}" &&
    echo "${want}" > "${stamp}" || { log "could not install ${requirements}"; exit 1; }
fi

so="$(bazel info --config=cuda bazel-bin 2>/dev/null)/python/distributed_embeddings/python/ops/_embedding_ops.so"
[[ -f "${so}" ]] || { log "no --config=cuda op library (bazel build --config=cuda first)"; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
cp -rL python/distributed_embeddings "${work}/"
chmod -R u+w "${work}"
cp -f "${so}" "${work}/distributed_embeddings/python/ops/_embedding_ops.so"

status=0
tests=(tests/gpu_registration_test.py)
for t in tests/*_test.py; do
  [[ "${t}" == tests/gpu_registration_test.py ]] || tests+=("${t}")
done
for t in "${tests[@]}"; do
  name="$(basename "${t}" .py)"
  log "${name}"
  if ! PYTHONPATH="${work}:${repo}/tests" XML_OUTPUT_FILE="${work}/${name}.xml" \
    TF_CPP_MIN_LOG_LEVEL=2 timeout 1800 "${venv}/bin/python3" "${t}" > "${work}/${name}.log" 2>&1; then
    status=1
    tail -40 "${work}/${name}.log" >&2
    # A test that died before writing its XML still counts, as one failed case.
    [[ -s "${work}/${name}.xml" ]] || printf '%s\n' \
      "<testsuites><testsuite name=\"${name}\" tests=\"1\"><testcase classname=\"gpu_tf\"" \
      " name=\"${name}\"><failure message=\"exited before writing results\"/></testcase>" \
      '</testsuite></testsuites>' > "${work}/${name}.xml"
  fi
done

# One JUnit file with every test's suites.
"${venv}/bin/python3" - "${out}" "${work}"/*.xml <<'EOF'
import sys
import xml.etree.ElementTree as ET

root = ET.Element("testsuites")
for path in sys.argv[2:]:
  parsed = ET.parse(path).getroot()
  suites = [parsed] if parsed.tag == "testsuite" else list(parsed.iter("testsuite"))
  root.extend(suites)
ET.ElementTree(root).write(sys.argv[1], encoding="utf-8", xml_declaration=True)
EOF
exit ${status}
