"""Dumps, as JSON, what pipeprobe's line-number decoding must agree with in this interpreter.

    lines.py    {"minor", "codes": [{"table", "first", "lines"}], "layout": {...}}

codes: every code object of a few standard-library modules (nested ones included), with its raw
co_linetable (hex), co_firstlineno and co_lines(). layout: where this interpreter keeps
co_linetable and the bytecode in a code object, and where a suspended frame keeps its
position, measured with ctypes on live objects.
"""
import ctypes
import json
import sys
import types

import argparse, email.parser, json.decoder, textwrap, zipfile  # noqa: E401 (sources of code)

MINOR = sys.version_info[1]


def walk(code):
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from walk(c)


def module_codes():
    for mod in (argparse, email.parser, json.decoder, textwrap, zipfile):
        for obj in vars(mod).values():
            funcs = [obj]
            if isinstance(obj, type):
                funcs = list(vars(obj).values())
            for f in funcs:
                if isinstance(f, types.FunctionType):
                    yield from walk(f.__code__)


def word(addr):
    return ctypes.c_uint64.from_address(addr).value


def layout():
    def f():
        return sys._getframe()

    co = f.__code__
    out = {"linetable": [o for o in range(0, 256, 8) if word(id(co) + o) == id(co.co_linetable)]}
    if hasattr(co, "_co_code_adaptive"):
        ad = co._co_code_adaptive
        out["code_adaptive"] = [
            o for o in range(0, 320, 8) if ctypes.string_at(id(co) + o, len(ad)) == ad
        ]
    else:
        out["code_adaptive"] = [0]

    # A frame suspended in a call: its position stays put while we read it.
    def probe():
        fr = sys._getframe().f_back
        if MINOR == 10:
            at = [o for o in range(0, 160, 4) if ctypes.c_int32.from_address(id(fr) + o).value * 2 == fr.f_lasti]
        else:
            iframe = word(id(fr) + 24)
            start = id(fr.f_code) + out["code_adaptive"][0]
            at = [o for o in range(0, 128, 8) if word(iframe + o) - start == fr.f_lasti]
        return at

    def caller():
        x = 1
        return probe()

    out["frame_instr"] = caller()
    return out


codes = [
    {
        "table": c.co_linetable.hex(),
        "first": c.co_firstlineno,
        "lines": [list(r) for r in c.co_lines()],
    }
    for c in module_codes()
]
print(json.dumps({"minor": MINOR, "codes": codes, "layout": layout()}))
