"""vae/common/errors.py: one line per failure, out-of-memory errors named as such with what they asked for."""
from __future__ import annotations

import numpy as np
import pytest

from vae.common.errors import UserError, describe, is_out_of_memory, memory_hint, shorten

CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)")


def test_shortened_text_never_ends_inside_a_number():
    for limit in range(20, len(CPU_OOM)):
        text = shorten(CPU_OOM, limit)
        assert len(text) <= limit and text.endswith("...")
        assert CPU_OOM.startswith(text[:-3]) and CPU_OOM[len(text) - 3] in " ,.:;", (limit, text)
    assert "4000000" not in describe(RuntimeError(CPU_OOM), 120)


def test_numpy_and_python_memory_errors_count_as_out_of_memory():
    try:
        np.empty((2**62,), dtype=np.uint8)
    except MemoryError as e:  # numpy's _ArrayMemoryError
        assert is_out_of_memory(e)
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError(CPU_OOM))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("error, size", [
    (RuntimeError(CPU_OOM), "37.3 GiB"),
    (RuntimeError("CUDA out of memory. Tried to allocate 95.37 GiB. GPU 0 has a total capacity of 79.19 GiB"),
     "95.37 GiB"),
    (None, "4.00 EiB"),  # numpy's own message
])
def test_the_memory_hint_says_how_much_and_names_the_settings(error, size):
    with pytest.raises(UserError) as e, memory_hint("while testing", "estimator_samples=100000 x batch_size=100"):
        if error is None:
            np.empty((2**62,), dtype=np.uint8)
        raise error
    message = str(e.value)
    assert message.startswith("out of memory while testing (it asked for ") and size in message
    assert message.endswith("its size grows with estimator_samples=100000 x batch_size=100: lower them")


def test_an_entry_point_turns_memory_and_file_system_errors_into_one_line(capsys):
    from vae.common.errors import entry_point

    def failing(error):
        @entry_point
        def task(cfg):
            raise error
        return task

    for error, needle in ((RuntimeError(CPU_OOM), "error: out of memory (it asked for 37.3 GiB at once): lower the "),
                          (MemoryError(), "error: out of memory: lower the settings"),
                          (IsADirectoryError(21, "Is a directory", "/x/y"), "error: cannot use /x/y: Is a directory")):
        with pytest.raises(SystemExit) as e:
            failing(error)({})
        assert e.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(needle), lines
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        failing(ZeroDivisionError())({})
