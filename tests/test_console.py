"""Progress display and log files."""
from __future__ import annotations

import io
import logging

import pytest

from streamrom.cli import main as cli_main
from streamrom.console import ConsoleHandler, ProgressTracker


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_eta_from_the_steps_done_in_this_process():
    clock = FakeClock()
    tracker = ProgressTracker(clock)
    assert "compress 4/10  ETA --" in tracker.describe(4, 10, "compress")  # resumed at 4: no rate yet
    clock.now += 30
    assert "compress 6/10  ETA 1m00s" in tracker.describe(6, 10, "compress")  # 15 s a block, 4 to go
    clock.now += 60
    assert "done in 1m30s" in tracker.describe(10, 10, "compress")
    assert "RSS" in tracker.describe(10, 10, "compress")


def record(message, progress=None):
    entry = logging.LogRecord("streamrom.compression.pipeline", logging.INFO, __file__, 1, message, (), None)
    if progress:
        entry.progress = progress
    return entry


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    plain = io.StringIO()
    handler = ConsoleHandler(plain)
    handler.emit(record("block 1/3 done", (1, 3, "compress")))
    handler.emit(record("a message"))
    lines = plain.getvalue().splitlines()
    assert lines[0].startswith("block 1/3 done  (compress 1/3") and "RSS" in lines[0]
    assert lines[1] == "a message"

    terminal = Terminal()
    handler = ConsoleHandler(terminal, width=10)
    handler.emit(record("block 1/2 done", (1, 2, "eval")))
    assert terminal.getvalue().startswith("\r\033[K[#####-----] eval 1/2")
    handler.emit(record("between"))  # clears the bar line before a message
    handler.emit(record("block 2/2 done", (2, 2, "eval")))
    assert "\r\033[Kbetween\n" in terminal.getvalue()
    assert terminal.getvalue().endswith("\n") and "[##########] eval 2/2  done in" in terminal.getvalue()


@pytest.mark.pipeline
def test_log_file_gets_every_line_even_when_quiet(tiny_models, tiny_tokens, tmp_path, capsys):
    log_file = tmp_path / "logs" / "nightly.log"
    code = cli_main(["--quiet", "--log-file", str(log_file), "compress", str(tiny_models["llama"]),
                     str(tmp_path / "out"), "--calib-tokens", str(tiny_tokens), "--calib-sequences", "4",
                     "--calib-seqlen", "64"])
    assert code == 0
    assert capsys.readouterr().err == ""
    text = log_file.read_text()
    assert "INFO streamrom.compression.execute: block 1/" in text and "(compress 1/" in text
    assert "compressed" in text


def test_unwritable_log_file_is_one_line(tmp_path, capsys):
    code = cli_main(["--log-file", str(tmp_path), "inspect", str(tmp_path)])  # a folder, not a file
    err = capsys.readouterr().err.strip()
    assert code == 4 and err.startswith("streamrom: error: cannot write the log file") and len(err.splitlines()) == 1
