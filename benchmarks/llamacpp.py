"""Build the llama.cpp that prunekit's GGUF exports are checked against, and cache it.

    python benchmarks/llamacpp.py build [--jobs 2] [--force]   # ~once per machine
    python benchmarks/llamacpp.py where                         # the cached bin folder, or how to build it

``build`` downloads the ``llama-cpp-python`` source distribution (the version in
:data:`prunekit.formats.llamacpp.VERSION`) from PyPI with ``pip download --no-binary :all:``,
configures the llama.cpp it vendors with cmake (CPU only, static, Release, native CPU flags, no
server/tests/examples/network), builds only ``llama-quantize``, ``llama-perplexity``, ``llama-bench``
and ``llama-completion``, links prunekit's logits dumper (``llamacpp_logits.cpp``, our code, llama.h
API only) against the same static libraries, copies the binaries to
``$PRUNEKIT_CACHE/llama.cpp-<version>/bin`` and records what it did (commit, flags, seconds) in
``build.json`` there. The source tree is deleted afterwards; nothing of llama.cpp enters the repo.

It is heavy (several minutes of both cores): on the shared machine run it under the lock,
``/work/bin/heavy --tag NAME python benchmarks/llamacpp.py build``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from common import save_json  # noqa: E402
from prunekit.formats.llamacpp import BINARIES, VERSION, available, bin_dir, cache_dir  # noqa: E402
from prunekit.report import environment  # noqa: E402

TARGETS = [b for b in BINARIES if b.startswith("llama-")]
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DGGML_BACKEND_DL=OFF",
               # AMX off: with -march=native on the Xeon hosts here (AMX flags, kernel permission granted) this
               # llama.cpp's AMX matmul (ggml_backend_amx_mul_mat) segfaults on every q8_0 / K-quant model at
               # the first prompt batch (llama-bench, llama-perplexity, our logits dumper; f32/bf16 unaffected);
               # explicit -mno-amx-* wins over -march=native in gcc, the AVX-512 kernels are used instead
               *([f"-DCMAKE_{lang}_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" for lang in ("C", "CXX")]
                 if platform.machine() in ("x86_64", "AMD64") else [])]


def sh(cmd: list[str], cwd: Path | None = None, log=None) -> None:
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT if log else None)
    if proc.returncode != 0:
        tail = ""
        if log is not None:
            log.flush()
            tail = Path(log.name).read_text()[-3000:]
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def sdist(root: Path) -> Path:
    """The cached sdist tarball (downloaded from PyPI once)."""
    found = sorted(root.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if found:
        return found[0]
    sh([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
        "-d", str(root), f"llama-cpp-python=={VERSION}"])
    found = sorted(root.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if not found:
        sys.exit(f"pip download left no llama_cpp_python-{VERSION}.tar.gz in {root}")
    return found[0]


def extract(tarball: Path, dest: Path) -> Path:
    """Unpack only the vendored llama.cpp (and its git metadata, for the commit id)."""
    prefix = f"llama_cpp_python-{VERSION}/"
    with tarfile.open(tarball) as tf:
        members = [m for m in tf.getmembers()
                   if m.name.startswith(prefix + "vendor/llama.cpp") or m.name.startswith(prefix + ".git/modules")]
        tf.extractall(dest, members=members, filter="data")
    return dest / prefix / "vendor" / "llama.cpp"


def commit_of(src: Path) -> str | None:
    proc = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def link_logits(src: Path, build: Path, out: Path, log) -> None:
    """Compile ``llamacpp_logits.cpp`` against the static llama/ggml libraries of ``build``."""
    libs = {Path(p).name: p for p in glob.glob(str(build / "**" / "*.a"), recursive=True)}
    order = ["libllama.a", "libggml.a", "libggml-cpu.a", "libggml-base.a"]
    missing = [n for n in order if n not in libs]
    if missing:
        sys.exit(f"static libraries {missing} not found under {build}")
    sh(["g++", "-O2", "-std=c++17", f"-I{src / 'include'}", f"-I{src / 'ggml' / 'include'}",
        str(HERE / "llamacpp_logits.cpp"), "-o", str(out), *[libs[n] for n in order],
        "-fopenmp", "-lpthread", "-ldl", "-lm"], log=log)


def build(args) -> None:
    root = cache_dir()
    if all(available(b) for b in BINARIES) and not args.force:
        if _built_flags() == CMAKE_FLAGS:
            print(f"already built: {bin_dir()} (--force to rebuild)")
            return
        print(f"the build in {bin_dir()} used other cmake flags than {CMAKE_FLAGS}: rebuilding")
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tarball = sdist(root)
    work = root / "work"
    shutil.rmtree(work, ignore_errors=True)
    src = extract(tarball, work / "src")
    build_dir = work / "build"
    t_cfg = time.perf_counter()
    with open(root / "build.log", "w") as log:
        sh(["cmake", "-S", str(src), "-B", str(build_dir), "-G", "Ninja" if shutil.which("ninja") else "Unix Makefiles",
            *CMAKE_FLAGS], log=log)
        sh(["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(args.jobs), "--target", *TARGETS],
           log=log)
        tmp_bin = work / "bin"
        tmp_bin.mkdir()
        link_logits(src, build_dir, tmp_bin / "prunekit-logits", log)
    for name in TARGETS:
        found = [p for p in build_dir.rglob(name) if p.is_file() and os.access(p, os.X_OK)]
        if not found:
            sys.exit(f"{name} was not built (see {root / 'build.log'})")
        shutil.copy2(found[0], tmp_bin / name)
    info = {"llama_cpp_python": VERSION, "llama_cpp_commit": commit_of(src), "cmake_flags": CMAKE_FLAGS,
            "targets": TARGETS + ["prunekit-logits"], "jobs": args.jobs, "compiler": _version(["g++", "--version"]),
            "cmake": _version(["cmake", "--version"]), "machine": platform.machine(),
            "processor": environment()["processor"],
            "download_and_extract_s": round(t_cfg - t0, 1), "build_s": round(time.perf_counter() - t_cfg, 1),
            "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    shutil.rmtree(root / "bin", ignore_errors=True)
    os.replace(tmp_bin, root / "bin")  # the bin folder appears complete or not at all
    save_json(root / "build.json", info)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(info, indent=1))
    print(f"built {len(BINARIES)} binaries into {bin_dir()} in {info['build_s']:.0f} s")


def _built_flags() -> list[str] | None:
    f = cache_dir() / "build.json"
    try:
        return json.loads(f.read_text()).get("cmake_flags")
    except (OSError, ValueError):
        return None


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "?"




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download the sdist, build and cache llama.cpp")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    b.add_argument("--force", action="store_true", help="rebuild even if the binaries are cached")
    sub.add_parser("where", help="print the cached bin folder (exit 1 if absent)")
    args = ap.parse_args()
    if args.cmd == "build":
        build(args)
    elif all(available(n) for n in BINARIES):
        print(bin_dir())
    else:
        sys.exit(f"not built: run `python benchmarks/llamacpp.py build` (cache: {cache_dir()})")


if __name__ == "__main__":
    main()
