"""Print the pip wheel's iree-compile and its `iree` package directory, one a line."""

from pathlib import Path

import iree.compiler
from iree.compiler.tools.binaries import find_tool

print(find_tool("iree-compile"))
print(Path(iree.compiler.__file__).parent.parent)
