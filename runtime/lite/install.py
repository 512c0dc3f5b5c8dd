"""Find or install MindSpore Lite 2.0 and build framegraph's native shims against it (standard library only).

Where the Lite libraries come from, first match wins:

1. ``mslite_home`` (argument) or the ``MSLITE_HOME`` environment variable: an unpacked MindSpore Lite package, in the
   wheel layout (``mindspore_lite/{include,lib}``) or the official tarball layout (``runtime/{include,lib}`` plus
   ``tools/converter/lib``); a ``.whl`` file is unpacked into the cache like a downloaded one.
2. Otherwise the PyPI wheel ``mindspore-lite==2.0.0``. PyPI has it for CPython 3.7 only, so it is fetched with
   ``pip download`` for that Python's tags (the libraries do not link libpython) and only its ``lib`` and
   ``include`` trees are unpacked, less the CPython 3.7 binding and the GPU/Ascend plugins, which need SDKs that a
   CPU install lacks.

The shims (``shim/framegraph_lite.cc`` for the runtime, ``shim/framegraph_lite_convert.cc`` for the ONNX converter)
are compiled with g++ into ``build-<key>/`` of the cache, where the key hashes the shim sources, the compile flags and
the Lite folder, so that a changed source or another Lite rebuilds. The cache is
``$FRAMEGRAPH_CACHE/mindspore-lite/2.0.0-<arch>`` (``FRAMEGRAPH_CACHE`` defaults to ``~/.cache/framegraph``). Every
step writes into a temporary folder that is renamed into place when complete, so an interrupted setup never leaves a
folder that a later run takes for finished; concurrent setups serialise on a lock file.

``setup_lite()`` does all of this (``framegraph setup-lite``); ``find_lite()`` only returns a finished install.
"""

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..cache import cache_root

logger = logging.getLogger(__name__)

LITE_VERSION = "2.0.0"
# platform.machine() -> the platform tag whose PyPI wheel holds that architecture's libraries
WHEEL_PLATFORMS = {"x86_64": "manylinux1_x86_64", "aarch64": "manylinux2014_aarch64"}
ELF_MACHINES = {"x86_64": 0x3E, "aarch64": 0xB7}
# runtime library names: the wheel's, then the official package's
RUNTIME_LIBRARIES = ("libmindspore-extendrt_python.so", "libmindspore-lite.so")
CONVERTER_LIBRARY = "libmindspore_converter.so"
# wheel libraries left out: the CPython 3.7 binding and plugins that need CUDA/TensorRT or Ascend SDKs
SKIPPED_LIBRARIES = ("_c_lite_wrapper", "tensorrt", "ascend", "dvpp", "transformer-shared", "mslite_shared_lib")
SHIM_DIR = Path(__file__).parent / "shim"
RUNTIME_SHIM_SOURCE = SHIM_DIR / "framegraph_lite.cc"
CONVERTER_SHIM_SOURCE = SHIM_DIR / "framegraph_lite_convert.cc"
RUNTIME_SHIM = "libframegraph_lite.so"
CONVERTER_TOOL = "framegraph_lite_convert"
CXXFLAGS = ("-O2", "-std=c++17", "-D_GLIBCXX_USE_CXX11_ABI={abi}")
BUILD_INFO = "build.json"
PACKAGE_SOURCE = "source.json"


class LiteSetupError(RuntimeError):
    """MindSpore Lite could not be found, downloaded or built against; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class LiteInstall:
    """A usable Lite install: ``home`` (the package folder), ``lib_dir`` (its runtime libraries), ``shim`` (the
    compiled runtime shim for ctypes) and ``converter`` (the ONNX -> .ms tool; None where the package has none)."""

    home: Path
    lib_dir: Path
    shim: Path
    converter: Path | None


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a Lite package keeps what the shims compile and link against."""

    include_root: Path  # holds include/api/model.h (the headers include "include/api/...")
    lib_dir: Path
    runtime_library: str
    converter_include_root: Path | None  # holds include/registry/converter_context.h
    converter_lib_dir: Path | None
    library_dirs: tuple  # every folder of the package with shared libraries (rpath)


def default_cache_dir():
    """``$FRAMEGRAPH_CACHE/mindspore-lite/<version>-<arch>``, ``FRAMEGRAPH_CACHE`` defaulting to ~/.cache/framegraph."""
    return cache_root() / "mindspore-lite" / f"{LITE_VERSION}-{platform.machine()}"


def find_lite(mslite_home=None, cache_dir=None):
    """The finished install for ``mslite_home`` (else ``MSLITE_HOME``, else the cached wheel), or None where
    ``setup_lite`` has not built it: nothing is downloaded or compiled."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        home = _home_argument(mslite_home)
    except LiteSetupError as exc:
        logger.info("no MindSpore Lite: %s", exc)
        return None
    if home is not None and home.suffix == ".whl":
        home = cache / "package"
    home = home or cache / "package"
    try:
        layout = _layout(home)
    except LiteSetupError:
        return None
    return _built(cache, home, layout)


def setup_lite(mslite_home=None, cache_dir=None, download=True):
    """Find or install MindSpore Lite and build the shims (the module docstring gives the order); returns the
    :class:`LiteInstall`. A finished install in the cache is returned as it is. ``download=False`` refuses to fetch
    the wheel. Raises :class:`LiteSetupError` with what to do."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache):
        for stale in cache.glob(".*-*"):  # staging folders of an interrupted setup (none run while we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        home = _home_argument(mslite_home)
        if home is not None and home.suffix == ".whl":
            if _package_source(cache) != _wheel_identity(home):
                _unpack_wheel(home, cache)
            home = cache / "package"
        elif home is None:
            home = cache / "package"
            if not (home / "mindspore_lite").is_dir():
                if not download:
                    raise LiteSetupError(f"MindSpore Lite is not installed in {cache} and download=False: run "
                                         "`framegraph setup-lite`, or set MSLITE_HOME to an unpacked Lite package")
                home = _unpack_wheel(_download_wheel(cache), cache, remove_wheel=True)
        layout = _layout(home)
        install = _built(cache, home, layout)
        if install is None:
            install = _build(cache, home, layout)
        return install


# -- locating a package ------------------------------------------------------------------------------------------

def _home_argument(mslite_home):
    value = mslite_home if mslite_home is not None else os.environ.get("MSLITE_HOME") or None
    if value is None:
        return None
    home = Path(value).expanduser().resolve()
    if not home.exists():
        raise LiteSetupError(f"MSLITE_HOME / mslite_home {home} does not exist: point it at an unpacked MindSpore Lite "
                             "package (the folder holding mindspore_lite/ or runtime/), or unset it to download "
                             f"mindspore-lite=={LITE_VERSION} from PyPI")
    return home


def _layout(home):
    roots = [home, home / "mindspore_lite", home / "runtime"]
    include_root = next((r for r in roots if (r / "include" / "api" / "model.h").is_file()), None)
    if include_root is None:
        raise LiteSetupError(
            f"{home} holds no MindSpore Lite C++ headers (include/api/model.h; looked in "
            f"{', '.join(str(r) for r in roots)}): set MSLITE_HOME to an unpacked Lite {LITE_VERSION} package (the "
            "folder with mindspore_lite/ from the wheel, or runtime/ from the official tarball), or unset it so that "
            "`framegraph setup-lite` downloads the wheel")
    lib_dirs = [include_root / "lib", *(r / "lib" for r in roots)]
    found = [(d, name) for d in lib_dirs for name in RUNTIME_LIBRARIES if (d / name).is_file()]
    if not found:
        raise LiteSetupError(f"{home} has headers but no runtime library ({' or '.join(RUNTIME_LIBRARIES)} in a lib/ "
                             "folder): the package is incomplete; unpack it again or unset MSLITE_HOME")
    lib_dir, runtime_library = found[0]
    converter_dirs = [lib_dir, home / "tools" / "converter" / "lib"]
    converter_lib_dir = next((d for d in converter_dirs if (d / CONVERTER_LIBRARY).is_file()), None)
    header_roots = [include_root, home / "tools" / "converter"]
    converter_include = next(
        (r for r in header_roots if (r / "include" / "registry" / "converter_context.h").is_file()), None)
    library_dirs = [lib_dir] + ([converter_lib_dir] if converter_lib_dir else [])
    for folder, _, files in os.walk(home):
        if any(".so" in name for name in files) and Path(folder) not in library_dirs:
            library_dirs.append(Path(folder))
    return _Layout(include_root, lib_dir, runtime_library, converter_include,
                   converter_lib_dir if converter_include else None, tuple(library_dirs))


# -- the wheel ---------------------------------------------------------------------------------------------------

def _download_wheel(cache):
    machine = platform.machine()
    if machine not in WHEEL_PLATFORMS:
        raise LiteSetupError(f"PyPI's mindspore-lite {LITE_VERSION} has wheels for {sorted(WHEEL_PLATFORMS)}, not "
                             f"{machine}: install MindSpore Lite for this machine and set MSLITE_HOME to it")
    target = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.7",
               "--platform", WHEEL_PLATFORMS[machine], "--implementation", "cp", "--abi", "cp37m",
               f"mindspore-lite=={LITE_VERSION}", "-d", str(target)]
    logger.info("downloading mindspore-lite %s for %s (about 170 MB): %s", LITE_VERSION, machine, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(target.glob("mindspore_lite-*.whl"))
    if result.returncode != 0 or not wheels:
        shutil.rmtree(target, ignore_errors=True)
        raise LiteSetupError(
            f"`pip download mindspore-lite=={LITE_VERSION}` failed (exit {result.returncode}):\n"
            f"{output_tail(result.stdout + result.stderr)}\nCheck the network and pip's index settings (PIP_INDEX_URL, "
            "proxies), or fetch the wheel elsewhere and pass its path as MSLITE_HOME")
    return wheels[0]


def _wheel_identity(wheel):
    stat = wheel.stat()
    return {"wheel": str(wheel), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _package_source(cache):
    """What ``cache/package`` was unpacked from (``_wheel_identity`` of the wheel), or None."""
    try:
        return json.loads((cache / "package" / PACKAGE_SOURCE).read_text())
    except (OSError, ValueError):
        return None


def _unpack_wheel(wheel, cache, remove_wheel=False):
    """Unpack the wheel's lib/ and include/ trees into ``cache/package`` (atomically); returns that folder."""
    package = cache / "package"
    staging = Path(tempfile.mkdtemp(prefix=".package-", dir=cache))
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if _wanted(m)]
            if not any(m.endswith("/include/api/model.h") for m in members):
                raise LiteSetupError(f"{wheel} is not a MindSpore Lite wheel with C++ headers "
                                     "(no mindspore_lite/include/api/model.h)")
            logger.info("unpacking %d files of %s", len(members), wheel.name)
            for member in members:
                archive.extract(member, staging)
        _check_machine(staging / "mindspore_lite" / "lib")
        (staging / PACKAGE_SOURCE).write_text(json.dumps(_wheel_identity(wheel)))
        staging.chmod(0o755)
        if package.exists():
            shutil.rmtree(package)
        os.replace(staging, package)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if remove_wheel:
            shutil.rmtree(wheel.parent, ignore_errors=True)
    return package


def _wanted(member):
    parts = member.split("/")
    if len(parts) < 3 or parts[0] != "mindspore_lite" or parts[1] not in ("lib", "include") or member.endswith("/"):
        return False
    return parts[1] == "include" or not any(skip in parts[-1] for skip in SKIPPED_LIBRARIES)


def _check_machine(lib_dir):
    machine = platform.machine()
    library = lib_dir / RUNTIME_LIBRARIES[0]
    with open(library, "rb") as f:
        header = f.read(20)
    found = int.from_bytes(header[18:20], "little")
    if header[:4] != b"\x7fELF" or found != ELF_MACHINES.get(machine, found):
        raise LiteSetupError(f"{library} is not built for this machine ({machine}; ELF machine {found:#x}): the wheel "
                             "pip chose is for another architecture; install Lite for this machine and set MSLITE_HOME")


# -- building the shims ------------------------------------------------------------------------------------------

def _abi(layout):
    """The C++ string ABI of the Lite libraries: 1 where their exported mindspore names use std::__cxx11, else 0
    (the PyPI wheel)."""
    nm = shutil.which("nm")
    if nm is None:
        return 0
    result = subprocess.run([nm, "-D", "--defined-only", str(layout.lib_dir / layout.runtime_library)],
                            capture_output=True, text=True)
    return int(any("mindspore" in line and "__cxx11" in line for line in result.stdout.splitlines()))


def _build_key(home, layout, flags):
    digest = hashlib.sha256()
    for source in (RUNTIME_SHIM_SOURCE, CONVERTER_SHIM_SOURCE):
        digest.update(source.read_bytes())
    digest.update(json.dumps([str(home), str(layout.lib_dir), layout.runtime_library, list(flags)]).encode())
    return digest.hexdigest()[:16]


def _built(cache, home, layout):
    """The finished build for ``home`` in ``cache``, or None. The compile flags are stored with the build (so that
    finding it needs no nm or compiler); a build whose sources or Lite folder changed has another key."""
    for info_path in cache.glob(f"build-*/{BUILD_INFO}"):
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            continue
        if info.get("home") != str(home) or info.get("key") != _build_key(home, layout, info.get("flags", [])):
            continue
        folder = info_path.parent
        converter = folder / CONVERTER_TOOL
        return LiteInstall(home=home, lib_dir=layout.lib_dir, shim=folder / RUNTIME_SHIM,
                           converter=converter if converter.is_file() else None)
    return None


def _build_home(folder):
    try:
        return json.loads((folder / BUILD_INFO).read_text()).get("home")
    except (OSError, ValueError):
        return None


def _compiler():
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx or not shutil.which(cxx):
        raise LiteSetupError("building framegraph's MindSpore Lite shim needs a C++17 compiler: install g++ "
                             "(apt install g++, or dnf install gcc-c++) or set CXX to one")
    return cxx


def _build(cache, home, layout):
    cxx = _compiler()
    flags = tuple(flag.format(abi=_abi(layout)) for flag in CXXFLAGS)
    key = _build_key(home, layout, flags)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        rpath = [f"-Wl,-rpath,{d}" for d in layout.library_dirs]
        # DT_RPATH (not RUNPATH): the Lite libraries find each other through it, as they carry no rpath of their own
        common = [*flags, "-Wl,--disable-new-dtags", *rpath, *(f"-L{d}" for d in layout.library_dirs)]
        _compile([cxx, "-shared", "-fPIC", f"-I{layout.include_root}", f"-I{layout.include_root / 'include'}",
                  str(RUNTIME_SHIM_SOURCE), "-o", str(staging / RUNTIME_SHIM), *common,
                  f"-l:{layout.runtime_library}"])
        if layout.converter_lib_dir is not None:
            root = layout.converter_include_root
            _compile([cxx, f"-I{root}", f"-I{root / 'include'}", str(CONVERTER_SHIM_SOURCE), "-o",
                      str(staging / CONVERTER_TOOL), *common, f"-l:{CONVERTER_LIBRARY}", "-lmindspore_core"])
        else:
            logger.warning("%s has no ONNX converter (%s with converter headers): converting ONNX to .ms is not "
                           "available with this install", home, CONVERTER_LIBRARY)
        staging.chmod(0o755)
        (staging / BUILD_INFO).write_text(json.dumps({"home": str(home), "key": key, "flags": list(flags)}))
        folder = cache / f"build-{key}"
        for old in cache.glob("build-*"):  # this home's builds of older shim sources, and a same-key leftover
            if old == folder or _build_home(old) == str(home):
                shutil.rmtree(old)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    install = _built(cache, home, layout)
    logger.info("MindSpore Lite shims built in %s", install.shim.parent)
    return install


def _compile(command):
    logger.info("compiling %s", Path(command[command.index("-o") + 1]).name)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise LiteSetupError(f"compiling the MindSpore Lite shim failed:\n{' '.join(command)}\n"
                             f"{output_tail(result.stderr)}\nCheck that the compiler supports C++17 and that MSLITE_HOME is "
                             f"a MindSpore Lite {LITE_VERSION} package")


# -- helpers -----------------------------------------------------------------------------------------------------

class _locked:
    """An exclusive lock on ``cache/.lock`` for the duration of a with block (one setup per cache at a time)."""

    def __init__(self, cache):
        self.path = cache / ".lock"

    def __enter__(self):
        self.file = open(self.path, "w")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def output_tail(text, lines=30):
    """The last ``lines`` lines of a tool's output, for an error message."""
    return "\n".join(text.strip().splitlines()[-lines:])
