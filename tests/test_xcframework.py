"""The XCFramework's pieces that run on any system (the build itself needs a Mac with Xcode)."""

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
