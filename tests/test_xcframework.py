"""The XCFramework's pieces that run on any system (the build itself needs a Mac with Xcode)."""

import shutil
import subprocess
from pathlib import Path

import pytest

from gpt2_iree import xcframework
from gpt2_iree.files import write_json
from gpt2_iree.source_build import Tree


def test_the_xcframework_is_current_until_iree_or_its_code_changes(tmp_path):
    tree, code = Tree(tmp_path / "iree"), tmp_path / "xcframework.py"
    code.write_text("# the code that built it\n")
    tree.xcframework.mkdir(parents=True)
    write_json(tree.build_record, {"commit": "a" * 40})
    write_json(tree.xcframework_record, {"commit": "a" * 40, "code": xcframework.code_digests([code])})
    assert xcframework.current(tree, [code])

    code.write_text("# an edit\n")
    assert not xcframework.current(tree, [code])
    write_json(tree.xcframework_record, {"commit": "a" * 40, "code": xcframework.code_digests([code])})
    write_json(tree.build_record, {"commit": "b" * 40})
    assert not xcframework.current(tree, [code])


def compiled(directory: Path, name: str, source: str) -> Path:
    (directory / f"{name}.c").write_text(source)
    subprocess.run(["cc", "-c", directory / f"{name}.c", "-o", directory / f"{name}.o"], check=True)
    return directory / f"{name}.o"


def archive(directory: Path, name: str, *objects: Path) -> Path:
    subprocess.run(["ar", "rcs", directory / name, *objects], check=True)
    return directory / name


@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("cc", "ar", "nm")), reason="needs cc, ar and nm")
def test_the_merge_takes_the_unified_runtime_and_only_the_libraries_it_lacks(tmp_path):
    a = compiled(tmp_path, "a", "int iree_a(void) { return 1; }\n")
    # What a component only calls (flatcc_parse) or keeps to itself (static) it does not define.
    b = compiled(tmp_path, "b", "int flatcc_parse(void);\nstatic int helper(void) { return 2; }\n"
                                "int iree_b(void) { return helper() + flatcc_parse(); }\n")
    c = compiled(tmp_path, "c", "int flatcc_parse(void) { return 3; }\n")
    unified = archive(tmp_path, "libiree_runtime_unified.a", a, b)
    components = [archive(tmp_path, "libiree_a.a", a), archive(tmp_path, "libiree_b.a", b)]
    flatcc = archive(tmp_path, "libflatcc_parsing.a", c)
    previous_merge = archive(tmp_path, "libiree.a", a, b, c)

    assert xcframework.select_archives([*components, previous_merge, flatcc, unified]) == [unified, flatcc]
    # Without a unified library, the components are the runtime.
    assert xcframework.select_archives([flatcc, previous_merge, *components]) == sorted([*components, flatcc])
