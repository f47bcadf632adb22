"""Emit the cffi API-mode module ksmcore._ksmcore from csrc/ksmcore.h.

The block between CFFI-BEGIN and CFFI-END in the header is the cdef: the header is
the one source of truth for the C API. Only C is generated here; CMake compiles it.
"""

import hashlib
import pathlib
import re
import sys

import cffi

HERE = pathlib.Path(__file__).resolve().parent


def cdef_text() -> str:
    header = (HERE / "ksmcore.h").read_text()
    m = re.search(r"/\* CFFI-BEGIN \*/(.*?)/\* CFFI-END \*/", header, re.S)
    if not m:
        raise SystemExit("ksmcore.h has no CFFI-BEGIN/CFFI-END block")
    # cffi's parser does not know the fixed-width-array sizes given by macros or
    # C11 keywords; the block is written in the subset it accepts.
    return m.group(1)


def cdef_hash(text: str) -> str:
    """What _native.py compares to tell a stale build: the cdef's SHA-256."""
    return hashlib.sha256(text.encode()).hexdigest()


def main(out: str) -> None:
    ffi = cffi.FFI()
    text = cdef_text()
    ffi.cdef(text + "\nconst char *ksmcore_cdef_hash(void);\n")
    ffi.set_source(
        "ksmcore._ksmcore",
        '#include "ksmcore.h"\n'
        f'const char *ksmcore_cdef_hash(void) {{ return "{cdef_hash(text)}"; }}\n',
    )
    ffi.emit_c_code(out)


if __name__ == "__main__":
    main(sys.argv[1])
