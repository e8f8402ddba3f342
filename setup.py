"""Build for llava_fast: setuptools driving CMake (pybind11 module ``llava_fast._C``).

Environment flags:
  LLAVA_FAST_SKIP_CUDA_BUILD=1   skip all native code (pure-Python install; every op uses its PyTorch/Triton path)
  LLAVA_FAST_CUDA_ARCHS="80;90"  CUDA architectures for nvcc (PTX is added for the newest one)
  LLAVA_FAST_FORCE_CPU_ONLY=1    build only the C++ (CPU) sources even when nvcc is present
  LLAVA_FAST_REQUIRE_EXT=1       a failed native build stops the install (by default a failed CUDA build falls back
                                 to the C++ sources, and a failed C++ build to a pure-Python install, with a warning)
  LLAVA_FAST_CUTLASS_DIR=PATH    CUTLASS checkout or include dir: also build llava_fast/_cutlass_sm90.so (Hopper GEMMs
                                 with fused epilogues; sm_90 must be among the archs). Found automatically when the
                                 nvidia-cutlass package is installed; LLAVA_FAST_CUTLASS_DIR=0 skips it
  MAX_JOBS                       parallel compile jobs (default: number of CPUs)
  CMAKE_ARGS                     extra arguments passed to CMake

Without nvcc the C++ sources are built with the host compiler alone. The module never links libtorch. The source
distribution carries CMakeLists.txt and csrc/ through MANIFEST.in. The benchmark scripts of ``benchmarks/`` ship as
``llava_fast.benchmarks`` (``llava-fast bench`` runs them from an installed package); ``benchmarks/results`` does not.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def _find_cutlass_include():
    """The CUTLASS include directory (with cutlass/cutlass.h and cute/), or None."""
    env = os.environ.get("LLAVA_FAST_CUTLASS_DIR", "").strip()
    if env in ("0", "off", "no"):
        return None
    candidates = []
    if env:
        candidates += [Path(env) / "include", Path(env)]
    else:
        try:
            import cutlass_library  # the nvidia-cutlass wheel ships the headers

            candidates.append(Path(cutlass_library.__file__).parent / "source" / "include")
        except Exception:  # not installed, or broken
            pass
    for c in candidates:
        if (c / "cutlass" / "cutlass.h").exists() and (c / "cute").is_dir():
            return str(c)
    if env:
        print(f"llava_fast: LLAVA_FAST_CUTLASS_DIR={env} has no cutlass/cutlass.h; not building the CUTLASS library")
    return None


def _drop_stale_cmake_cache(build_temp: Path, generator: str) -> None:
    """Remove a CMake cache that this build could not reuse. pip builds in a fresh isolated environment each time, and
    the cache in ``build/`` (setuptools' build_temp, kept between builds) names the previous one's ninja and cmake:
    a second ``pip install .`` or ``pip wheel .`` from the same checkout then stopped at "Running '.../ninja'
    '--version' failed with: no such file or directory". A cache whose tools are gone, or made by another generator,
    is deleted (a full rebuild); one whose tools still exist (``--no-build-isolation``) keeps incremental builds."""
    cache = build_temp / "CMakeCache.txt"
    if not cache.exists():
        return
    entries = {}
    for line in cache.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", "//")):
            entries[key.split(":", 1)[0]] = value
    tools = [entries.get(k) for k in ("CMAKE_MAKE_PROGRAM", "CMAKE_COMMAND")]
    missing = [t for t in tools if t and not Path(t).exists()]
    if missing or entries.get("CMAKE_GENERATOR", generator) != generator:
        why = f"{missing[0]} no longer exists" if missing else f"it was made by {entries.get('CMAKE_GENERATOR')}"
        print(f"llava_fast: removing the CMake cache in {build_temp} ({why}); full rebuild")
        shutil.rmtree(build_temp)
        build_temp.mkdir(parents=True, exist_ok=True)


class CMakeExtension(Extension):
    """Marker extension: the real work happens in CMakeBuild."""

    def __init__(self, name: str, sourcedir: Path = ROOT):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def run(self):
        if _truthy("LLAVA_FAST_SKIP_CUDA_BUILD"):
            print("llava_fast: LLAVA_FAST_SKIP_CUDA_BUILD=1, skipping native code (ops use their PyTorch/Triton paths)")
            return
        super().run()

    def build_extension(self, ext: CMakeExtension):
        build_temp = Path(self.build_temp) / ext.name
        nvcc = None if _truthy("LLAVA_FAST_FORCE_CPU_ONLY") else _find_nvcc()
        try:
            self._cmake(ext, build_temp, nvcc)
            return
        except (subprocess.CalledProcessError, OSError) as e:
            if _truthy("LLAVA_FAST_REQUIRE_EXT"):
                raise
            failed = e
        # the package works without llava_fast._C (every op has its PyTorch/Triton path): a compiler that cannot
        # build it must not stop the install (users.md: flash-attn's build failures are the install pain users name)
        if nvcc:
            print(f"llava_fast: WARNING: the CUDA build failed ({failed}); building the C++ (CPU) sources only")
            shutil.rmtree(build_temp, ignore_errors=True)
            try:
                self._cmake(ext, build_temp, None)
                return
            except (subprocess.CalledProcessError, OSError) as e:
                failed = e
        print(f"llava_fast: WARNING: the native build failed ({failed}); installing without llava_fast._C: every op "
              f"uses its PyTorch/Triton path (`llava-fast env` says ext: no). LLAVA_FAST_REQUIRE_EXT=1 makes this an "
              f"error; pip install -v shows the compiler's output")

    def _cmake(self, ext: CMakeExtension, build_temp: Path, nvcc):
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("LLAVA_FAST_CUDA_ARCHS", "80;90")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DLLAVA_FAST_CUDA_ARCHS={archs}",
        ]
        if nvcc:
            args += ["-DLLAVA_FAST_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
            print(f"llava_fast: building C++ and CUDA sources with {nvcc} for archs {archs}")
            cutlass = _find_cutlass_include()
            args.append(f"-DLLAVA_FAST_CUTLASS_INCLUDE={cutlass or ''}")
            if cutlass and "90" in archs.split(";"):
                print(f"llava_fast: building the CUTLASS library (sm_90a) with {cutlass}")
        else:
            why = ("LLAVA_FAST_FORCE_CPU_ONLY=1" if _truthy("LLAVA_FAST_FORCE_CPU_ONLY") else
                   "nvcc not found" if _find_nvcc() is None else "the CUDA build failed")
            print(f"llava_fast: {why}, building the C++ (CPU) sources only")
        generator = "Ninja" if shutil.which("ninja") else "Unix Makefiles"
        if generator == "Ninja":
            args += ["-G", "Ninja"]
        _drop_stale_cmake_cache(build_temp, generator)
        args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", ext.sourcedir, *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)
        # The CUTLASS library is not a Python extension, so an editable install would not copy it next to _C:
        # do it here (a wheel build takes everything in extdir anyway).
        lib = extdir / "_cutlass_sm90.so"
        if lib.exists() and (getattr(self, "editable_mode", False) or self.inplace):
            shutil.copy2(lib, ROOT / "llava_fast" / lib.name)

# Every llava_fast package, and the repository's benchmarks/ mapped to llava_fast.benchmarks (scripts only).
PACKAGES = find_packages(include=["llava_fast", "llava_fast.*"]) + ["llava_fast.benchmarks"]
PACKAGE_DIR = {"llava_fast.benchmarks": "benchmarks"}

setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=[CMakeExtension("llava_fast._C")],
      cmdclass={"build_ext": CMakeBuild})
