"""IREE's runtime as one XCFramework for iOS devices, the iOS simulator and macOS.

The runtime is cross-built from toolchain=source's checkout, once per platform
and architecture (CMake + Ninja, with the host tools of iree_build's install),
as the build.sh of iree-for-apple-platforms did in 2023:

  1. each build's installed static libraries merged into one `libiree.a`
     (libtool): IREE's unified runtime library and the third-party ones it
     lacks (see `select_archives`),
  2. a platform's architectures into one fat library (lipo),
  3. the three platforms, each with the runtime's headers, into
     `iree.xcframework` (xcodebuild -create-xcframework).

Needs a Mac with Xcode. Standard library only at import time (the task graph
imports this module on every system).
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import subprocess
from pathlib import Path

from gpt2_iree.files import sha256_file, write_json
from gpt2_iree.source_build import BuildError, Tree, read_json, require_build_tools, run_logged

# The component under which IREE installs the runtime's libraries and headers.
RUNTIME_COMPONENT = "IREEDevLibraries-Runtime"
# The runtime as one static library, which IREE makes of the component
# libraries it installs beside it.
UNIFIED_LIBRARY = "libiree_runtime_unified.a"
# What a build's libraries are merged into.
MERGED_LIBRARY = "libiree.a"


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    system: str  # CMAKE_SYSTEM_NAME
    sdk: str  # as `xcrun --sdk` names it
    archs: tuple[str, ...]
    # The modules embed MSL 3.0 source, which Metal compiles on macOS 13 / iOS 16 and later.
    min_os: str


SLICES = (
    Slice("ios", "iOS", "iphoneos", ("arm64",), "16.0"),
    Slice("ios-simulator", "iOS", "iphonesimulator", ("arm64", "x86_64"), "16.0"),
    Slice("macos", "Darwin", "macosx", ("arm64", "x86_64"), "13.0"),
)


def require_xcode() -> None:
    if platform.system() != "Darwin":
        raise BuildError(f"the XCFramework needs macOS with Xcode; this is {platform.system()}")
    missing = [tool for tool in ("xcodebuild", "xcrun", "libtool", "lipo", "nm") if not shutil.which(tool)]
    if missing or subprocess.run(["xcodebuild", "-version"], capture_output=True).returncode != 0:
        raise BuildError(f"the XCFramework needs Xcode (xcodebuild{', ' + ', '.join(missing) if missing else ''}): "
                         f"install it from the App Store and select it with "
                         f"`sudo xcode-select -s /Applications/Xcode.app`; the Command Line Tools alone lack xcodebuild")


def code_digests(sources) -> dict[str, str]:
    """The sha256 of each file of the code that builds the XCFramework, by name."""
    return {Path(path).name: sha256_file(path) for path in sources}


def current(tree: Tree, sources) -> bool:
    """Up to date while the XCFramework was made from the commit iree_build
    built, by the code in `sources` as it is now."""
    record, build = read_json(tree.xcframework_record), read_json(tree.build_record)
    return bool(record and build and record.get("commit") == build["commit"]
                and record.get("code") == code_digests(sources) and tree.xcframework.is_dir())


def defined_symbols(archive: Path) -> set[str]:
    """The external symbols that the members of a static library define."""
    # `-g --defined-only` reads the same with GNU nm and Xcode's (LLVM's) nm.
    out = subprocess.run(["nm", "-g", "--defined-only", archive], check=True, capture_output=True,
                         text=True).stdout
    # A symbol's line is "address type name"; a member's header ("a.o:", or
    # "lib.a(a.o):" on macOS) is one word.
    return {fields[2] for fields in map(str.split, out.splitlines()) if len(fields) == 3}


def select_archives(archives) -> list[Path]:
    """The static libraries to merge into one: IREE's unified runtime library
    and those it does not contain (third-party ones, e.g. flatcc's parser),
    or, without a unified library, all of them.

    A library whose every defined symbol the unified one defines is one of its
    components, and merging both would define those symbols twice: an app
    linked with -all_load or -ObjC (which the Metal driver's Objective-C needs)
    fails on that. A merged library, a previous run's output, is never taken.
    """
    archives = sorted(Path(p) for p in archives if Path(p).name != MERGED_LIBRARY)
    unified = next((p for p in archives if p.name == UNIFIED_LIBRARY), None)
    if unified is None:
        return archives
    in_unified = defined_symbols(unified)
    return [unified, *(p for p in archives if p != unified and not defined_symbols(p) <= in_unified)]


def _build_arch(tree: Tree, target: Slice, arch: str, tools: dict, log) -> Path:
    """The runtime for one platform and architecture: its merged static library."""
    build_dir = tree.runtime / f"{target.name}-{arch}"
    install = build_dir / "install"
    sdk = subprocess.run(["xcrun", "--sdk", target.sdk, "--show-sdk-path"], check=True, capture_output=True,
                         text=True).stdout.strip()
    options = {
        "CMAKE_BUILD_TYPE": "Release",
        "CMAKE_MAKE_PROGRAM": tools["ninja"],
        "CMAKE_OSX_SYSROOT": sdk,
        "CMAKE_OSX_ARCHITECTURES": arch,
        "CMAKE_SYSTEM_PROCESSOR": arch,
        "CMAKE_OSX_DEPLOYMENT_TARGET": target.min_os,
        "IREE_BUILD_COMPILER": "OFF",
        "IREE_BUILD_TESTS": "OFF",
        "IREE_BUILD_SAMPLES": "OFF",
        "IREE_BUILD_PYTHON_BINDINGS": "OFF",
        # iree-c-embed-data and iree-flatcc-cli, built for this Mac by iree_build.
        "IREE_HOST_BIN_DIR": str((tree.install / "bin").resolve()),
        # IREE's Metal driver supports Apple silicon only; x86_64 gets the CPU drivers.
        "IREE_HAL_DRIVER_METAL": "ON" if arch == "arm64" else "OFF",
    }
    if target.system != "Darwin":
        options["CMAKE_SYSTEM_NAME"] = target.system
    label = f"{target.name} {arch}"
    run_logged([tools["cmake"], "-G", "Ninja", "-S", tree.src, "-B", build_dir,
                *(f"-D{k}={v}" for k, v in options.items())], log, tree.runtime / "build.log",
               f"CMake configure ({label})")
    run_logged([tools["cmake"], "--build", build_dir], log, tree.runtime / "build.log", f"The runtime build ({label})",
               progress=f"runtime {label}")
    # Installed afresh: a library that an earlier IREE installed must not be merged.
    shutil.rmtree(install, ignore_errors=True)
    run_logged([tools["cmake"], "--install", build_dir, "--component", RUNTIME_COMPONENT, "--prefix", install],
               log, tree.runtime / "build.log", f"Installing the runtime ({label})")
    # An app links one library: the installed runtime and its third-party
    # dependencies, each symbol once.
    archives = select_archives((install / "lib").glob("*.a"))
    if not archives:
        raise BuildError(f"the runtime install has no static libraries in {install / 'lib'}; "
                         f"see {tree.runtime / 'build.log'}")
    merged = build_dir / MERGED_LIBRARY
    run_logged(["libtool", "-static", "-o", merged, *archives], log, tree.runtime / "build.log",
               f"Merging the static libraries ({label})")
    return merged


def build(tree: Tree, sources) -> None:
    """The xcframework stage: every slice's runtime, merged into tree.xcframework;
    the record names the commit and the code (`sources`, read before it runs)."""
    require_xcode()
    tools = require_build_tools()
    commit, code = read_json(tree.build_record)["commit"], code_digests(sources)
    tree.xcframework_record.unlink(missing_ok=True)  # a failed build must not look done
    tree.runtime.mkdir(parents=True, exist_ok=True)
    log_path = tree.runtime / "build.log"
    arguments = []
    with open(log_path, "w") as log:
        for target in SLICES:
            per_arch = [_build_arch(tree, target, arch, tools, log) for arch in target.archs]
            fat = tree.runtime / target.name / MERGED_LIBRARY
            fat.parent.mkdir(parents=True, exist_ok=True)
            run_logged(["lipo", "-create", *per_arch, "-output", fat], log, log_path, f"lipo ({target.name})")
            headers = tree.runtime / f"{target.name}-{target.archs[0]}" / "install" / "include"
            if not (headers / "iree" / "runtime" / "api.h").is_file():
                raise BuildError(f"the runtime install has no headers at {headers}; see {log_path}")
            arguments += ["-library", fat, "-headers", headers]
        # xcodebuild neither overwrites nor takes a name without .xcframework:
        # build it aside, then swap.
        tmp = tree.runtime / tree.xcframework.name
        shutil.rmtree(tmp, ignore_errors=True)
        run_logged(["xcodebuild", "-create-xcframework", *arguments, "-output", tmp], log, log_path,
                   "xcodebuild -create-xcframework")
    shutil.rmtree(tree.xcframework, ignore_errors=True)
    tmp.rename(tree.xcframework)
    write_json(tree.xcframework_record, {"commit": commit, "code": code,
                                         "slices": {s.name: list(s.archs) for s in SLICES}})
    print(f"xcframework: {tree.xcframework} (IREE {commit[:12]})")
