"""Build dist/claude_max_proxy.pyz, a single-file executable of the proxy.

The archive is what `python -m zipapp` would make, but reproducible: entries are written in a
fixed order with a fixed timestamp (1980-01-01, the earliest ZIP can store) and fixed modes, so
building the same source with the same Python twice gives byte-identical files.

Next to the module's source it carries the module compiled by the building Python
(claude_max_proxy.pyc, checked against the source's hash): a Python with the same bytecode
version runs it without compiling 5,000 lines at every start (zipimport cannot cache bytecode),
and any other Python finds its magic number wrong and compiles the source as before.

    python3 packaging/build_pyz.py [--source claude_max_proxy.py] [--output dist/claude_max_proxy.pyz]
"""

import argparse
import importlib.util
import marshal
import os
import stat
import sys
import tempfile
import zipfile

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SOURCE = os.path.join(REPO_DIR, "claude_max_proxy.py")
DEFAULT_OUTPUT = os.path.join(REPO_DIR, "dist", "claude_max_proxy.pyz")

SHEBANG = b"#!/usr/bin/env python3\n"
MODULE_NAME = "claude_max_proxy.py"
BYTECODE_NAME = "claude_max_proxy.pyc"  # where zipimport looks for a module's bytecode
CHECKED_HASH = 0b11  # PEP 552 flags: hash-based, checked against the source before use
MAIN_SOURCE = b"import sys, claude_max_proxy; sys.exit(claude_max_proxy.main())\n"
FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)
MEMBER_MODE = stat.S_IFREG | 0o644
ARCHIVE_MODE = 0o755


def archive_member(name):
    """A ZipInfo whose metadata does not depend on the build machine or the clock."""
    info = zipfile.ZipInfo(name, date_time=FIXED_DATE_TIME)
    info.create_system = 3  # Unix, so external_attr carries the mode
    info.external_attr = MEMBER_MODE << 16
    # Stored, not deflated: compressed bytes can differ between zlib builds (zlib-ng, for
    # one), and the module is small enough that size does not matter.
    info.compress_type = zipfile.ZIP_STORED
    return info


def bytecode_for(module_source):
    """The module as a .pyc for this Python (PEP 552, checked hash). Its code names the file
    MODULE_NAME, not the build path, so the bytes depend only on the source and the Python."""
    code = compile(module_source, MODULE_NAME, "exec", dont_inherit=True, optimize=0)
    return (importlib.util.MAGIC_NUMBER + CHECKED_HASH.to_bytes(4, "little")
            + importlib.util.source_hash(module_source) + marshal.dumps(code))


def build_pyz(source, output):
    """Write the archive for `source` to `output` atomically and make it executable."""
    with open(source, "rb") as f:
        module_source = f.read()
    bytecode = bytecode_for(module_source)  # also refuses a module that cannot compile

    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=".build-", suffix=".pyz", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(SHEBANG)
            with zipfile.ZipFile(f, "w") as archive:
                archive.writestr(archive_member("__main__.py"), MAIN_SOURCE)
                archive.writestr(archive_member(MODULE_NAME), module_source)
                archive.writestr(archive_member(BYTECODE_NAME), bytecode)
        os.chmod(tmp_path, ARCHIVE_MODE)
        os.replace(tmp_path, output)
    except BaseException:
        os.unlink(tmp_path)
        raise
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="build_pyz.py",
        description="Build a reproducible zipapp of claude_max_proxy.py.",
    )
    parser.add_argument("--source", default=DEFAULT_SOURCE,
                        help="module to package (default: %(default)s)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help="archive to write (default: %(default)s)")
    args = parser.parse_args(argv)
    print(build_pyz(args.source, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
