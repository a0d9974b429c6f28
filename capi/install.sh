#!/bin/sh
# Builds libtprun (release) and installs it for C and C++ programs:
#   capi/install.sh PREFIX            # e.g. /usr/local, or $HOME/.local
# puts PREFIX/include/tprun.h, PREFIX/lib/libtprun.{so,a}, PREFIX/lib/pkgconfig/tprun.pc and
# PREFIX/lib/cmake/tprun/tprunConfig{,Version}.cmake there, so that
#   pkg-config --cflags --libs tprun      (PKG_CONFIG_PATH=PREFIX/lib/pkgconfig)
#   find_package(tprun) -> tprun::tprun   (CMAKE_PREFIX_PATH=PREFIX)
# work. Options: --no-build installs what is already built; --from DIR takes the libraries from
# DIR (default target/release). Programs find libtprun.so at run time through the loader's
# paths (ldconfig for a system prefix, else LD_LIBRARY_PATH=PREFIX/lib or -Wl,-rpath).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
build=1
from="$root/target/release"
while [ $# -gt 1 ]; do
  case "$1" in
    --no-build) build=0; shift ;;
    --from) from=$2; shift 2 ;;
    *) break ;;
  esac
done
if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: capi/install.sh [--no-build] [--from DIR] PREFIX" >&2
  exit 2
fi
mkdir -p "$1"
prefix=$(cd "$1" && pwd)

if [ $build = 1 ]; then
  cargo build --release -p tprun-capi --manifest-path "$root/Cargo.toml"
fi
for f in libtprun.so libtprun.a; do
  if [ ! -f "$from/$f" ]; then
    echo "install.sh: $from/$f is missing (build it: cargo build --release -p tprun-capi)" >&2
    exit 1
  fi
done

# The version is the header's (a unit test keeps it equal to the library's).
def() { sed -n "s/^#define $1 \([0-9]*\)$/\1/p" "$root/include/tprun.h"; }
major=$(def TPRUN_MAJOR)
minor=$(def TPRUN_MINOR)
version="$major.$minor.$(def TPRUN_PATCH)"
# What libtprun.a needs from the system (rustc --print native-static-libs).
native="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"
native_cmake="gcc_s;util;rt;pthread;m;dl;c"

mkdir -p "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/lib/cmake/tprun"
cp "$root/include/tprun.h" "$prefix/include/"
cp "$from/libtprun.so" "$from/libtprun.a" "$prefix/lib/"
subst() {
  sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" -e "s|@MAJOR@|$major|g" \
    -e "s|@MINOR@|$minor|g" -e "s|@NATIVE_LIBS@|$native|g" \
    -e "s|@NATIVE_LIBS_CMAKE@|$native_cmake|g" "$here/$1" > "$2"
}
subst tprun.pc.in "$prefix/lib/pkgconfig/tprun.pc"
subst tprunConfig.cmake.in "$prefix/lib/cmake/tprun/tprunConfig.cmake"
subst tprunConfigVersion.cmake.in "$prefix/lib/cmake/tprun/tprunConfigVersion.cmake"
echo "installed tprun $version in $prefix"
