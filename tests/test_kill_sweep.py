"""Reliability, round three: every command killed (SIGKILL to its process group) at points found from its
own log lines and at moments between them, then rerun to the end: the outputs are byte for byte an
uninterrupted run's, nothing is left behind, the source is untouched (tests/kill_harness.py).

The default run kills each command at one point (its middle log line, or half its uninterrupted time,
command by command in turn); STREAMROM_KILL_SWEEP=full kills it after every log line and at STREAMROM_KILL_MOMENTS (8) moments,
and writes the table (command x points x result) that `python -m benchmarks.reliability.sweep` turns into
docs/reliability.md. Tiny random-weight models (files and control flow, not accuracy)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from streamrom.gguf.exporter import export_gguf
from streamrom.storage.layout import LLAMA_QUANTIZE_VARIABLE

from conftest import make_tiny
from kill_harness import Command, digest, kill_and_rerun, leftovers, reference, run_and_kill, run_to_end
from helpers import write_tiny_gguf

FULL = os.environ.get("STREAMROM_KILL_SWEEP") == "full"
TABLE = os.environ.get("STREAMROM_KILL_TABLE")
MOMENTS = int(os.environ.get("STREAMROM_KILL_MOMENTS", "8"))  # the long run's moments between log lines
TEXTS = Path(__file__).resolve().parent.parent / "data" / "eval"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny llama with a small byte-level BPE tokenizer (ids below its vocabulary of 256), calibration
    token ids, a tiny GGUF, and a compressed model for eval to compare with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    root = tmp_path_factory.mktemp("kill")
    source = make_tiny(root / "src", "llama")
    vocab = {chr(c): i for i, c in enumerate(range(33, 127))}
    vocab.update({"Ġ": len(vocab), "th": len(vocab) + 1, "Ġt": len(vocab) + 2})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("t", "h"), ("Ġ", "t")], unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(source / "tokenizer.json"))
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    tokens = root / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 256, size=8192))
    gguf = root / "tiny.gguf"
    write_tiny_gguf(gguf, "llama")
    base = root / "base-q4_0.gguf"  # correct's base: the source's own q4_0 export (with Llama 3's rope_freqs)
    export_gguf(source, base, "q4_0")
    return {"root": root, "source": source, "tokens": tokens, "gguf": gguf, "base": base}


def commands(world) -> dict[str, Command]:
    root, source, tokens = world["root"], world["source"], world["tokens"]
    calibration = ["--calib-tokens", str(tokens), "--calib-sequences", "8", "--calib-seqlen", "64",
                   "--chunk-tokens", "128"]

    def compress(name: str, *extra: str, calib=calibration) -> Command:
        output = root / f"out-{name}"
        return Command(f"compress {name}", ["compress", str(source), str(output), *calib, *extra], source, [output])

    texts = ["--calib-text", str(TEXTS / "carroll-alice.txt"), "--calib-sequences", "8", "--calib-seqlen", "64",
             "--chunk-tokens", "128"]
    found = {
        "compress rom uniform": compress("rom", "--method", "rom", "--ratio", "0.5"),
        "compress svd last-n": compress("svd", "--method", "svd", "--allocate", "last-n", "--ratio", "0.5"),
        "compress rom-centered last-n": compress("centered", "--method", "rom-centered", "--allocate", "last-n",
                                                 "--target-params", "0.8"),
        "compress structured spectrum": compress("structured", "--method", "structured", "--allocate", "spectrum",
                                                 "--target-params", "0.8"),
        "compress mixed spectrum": compress("mixed", "--method", "mixed", "--allocate", "spectrum",
                                            "--target-params", "0.8"),
        "compress mixed pass1": compress("pass1", "--method", "mixed", "--allocate", "spectrum",
                                         "--target-params", "0.8", "--neuron-selection", "pass1"),
        "compress mixed --anchor": compress("anchor", "--method", "mixed", "--allocate", "spectrum",
                                            "--target-params", "0.8", "--anchor"),
        "compress mixed --refine-steps": compress("refine", "--method", "mixed", "--allocate", "spectrum",
                                                  "--target-params", "0.8", "--refine-steps", "4"),
        "compress --target-text": compress("target", "--method", "rom-centered", "--target-params", "0.8",
                                           "--target-text", str(TEXTS / "python-code.txt"), calib=texts),
        "compress bayes": compress("bayes", "--method", "rom", "--allocate", "bayes", "--trials", "3", "--target-params", "0.8"),
        "compress bayes --study": compress("study", "--method", "rom", "--allocate", "bayes", "--trials", "3", "--target-params", "0.8",
                                           "--study", f"sqlite:///{root / 'study.db'}", "--heartbeat", "2"),
        "import-gguf": Command("import-gguf", ["import-gguf", str(world["gguf"]), str(root / "imported")],
                               world["gguf"], [root / "imported"]),
        "eval --reference": Command("eval --reference", ["eval", str(source), "--text", str(TEXTS / "carroll-alice.txt"),
                                                         "--max-windows", "4", "--seqlen", "64", "--reference",
                                                         str(source), "--report", str(root / "eval.json")],
                                    source, [root / "eval.json"]),
    }
    found["correct --adapter-size"] = Command("correct --adapter-size", [
        "correct", str(source), str(world["base"]), str(root / "adapter.gguf"), "--adapter-size", "0.02",
        *calibration], source, [root / "adapter.gguf"])  # (its --report holds stage times)
    sized, adapter = root / "export-sized.gguf", root / "export-sized.lora.gguf"
    found["export-gguf --target-size --adapter"] = Command("export-gguf --target-size --adapter", [
        "export-gguf", str(source), str(sized), "--target-size", "1", "--adapter", str(adapter),
        "--candidate-types", "q4_0", "q8_0", *calibration], source, [sized, adapter])
    for kind in ("source", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"):
        output = root / f"export-{kind}.gguf"
        found[f"export-gguf --type {kind}"] = Command(f"export-gguf --type {kind}", [
            "export-gguf", str(source), str(output), "--type", kind], source, [output])
    return found


NAMES = ["compress rom uniform", "compress structured spectrum", "compress mixed spectrum", "compress mixed pass1",
         "compress mixed --anchor", "compress --target-text", "compress bayes", "compress bayes --study", "import-gguf",
         "eval --reference", "correct --adapter-size", "export-gguf --type source", "export-gguf --type f32",
         "export-gguf --type f16", "export-gguf --type bf16", "export-gguf --type q8_0", "export-gguf --type q4_0",
         "compress svd last-n", "compress rom-centered last-n", "export-gguf --type q4_k_m",
         "compress mixed --refine-steps", "export-gguf --target-size --adapter"]
# made by llama.cpp's llama-quantize (a subprocess, killed with the command's process group): where it is built
NEEDS_LLAMA_QUANTIZE = {"export-gguf --type q4_k_m", "export-gguf --target-size --adapter"}


ONLY = [n for n in os.environ.get("STREAMROM_KILL_COMMANDS", "").split(",") if n]  # the long run's choice


@pytest.mark.parametrize("name", NAMES)
def test_killed_anywhere_then_rerun_is_identical(world, name):
    if ONLY and name not in ONLY:
        pytest.skip("not among STREAMROM_KILL_COMMANDS")
    if name in NEEDS_LLAMA_QUANTIZE and not (os.environ.get(LLAMA_QUANTIZE_VARIABLE) or shutil.which("llama-quantize")):
        pytest.skip(f"llama-quantize is not built (set {LLAMA_QUANTIZE_VARIABLE})")
    command = commands(world)[name]
    # a fresh study for each point (a finished one would only be read); the killed run's trial is given up
    # after three silent heartbeats (2 s here), then run again by the rerun
    study = world["root"] / "study.db"
    study.unlink(missing_ok=True)
    expected = reference(command)
    if FULL:
        lines = list(range(expected.lines + 1))
        moments = [expected.seconds * k / (MOMENTS + 1) for k in range(1, MOMENTS + 1)]
    elif NAMES.index(name) % 2:  # the default run: one point per command, a log line or a moment in turn
        lines, moments = [], [expected.seconds / 2]
    else:
        lines, moments = [max(1, expected.lines // 2)], []
    results = []
    for point in [("line", n) for n in lines] + [("seconds", round(t, 2)) for t in moments]:
        study.unlink(missing_ok=True)
        kwargs = {"line": point[1]} if point[0] == "line" else {"seconds": point[1]}
        results.append((point, kill_and_rerun(command, expected, **kwargs)))
    if TABLE:
        table = json.loads(Path(TABLE).read_text()) if Path(TABLE).is_file() else {}
        table[name] = {"log lines": expected.lines, "uninterrupted seconds": round(expected.seconds, 2),
                       "points": [[kind, value, result] for (kind, value), result in results]}
        Path(TABLE).write_text(json.dumps(table, indent=1) + "\n")


def worker_scene(world) -> tuple[Command, Command, Path]:
    """A shared search (compress --study, three trials: the startup points, so every trial's plan is fixed
    whichever process runs it) that one tune-worker joins: the worker is what gets killed."""
    root, study = world["root"], world["root"] / "worker-study.db"
    output, work = root / "out-worker", root / "worker-work"
    storage = f"sqlite:///{study}"
    compress = Command("compress for tune-worker", [
        "compress", str(world["source"]), str(output), "--calib-tokens", str(world["tokens"]), "--calib-sequences", "8",
        "--calib-seqlen", "64", "--chunk-tokens", "128", "--method", "rom", "--allocate", "bayes", "--trials", "3",
        "--target-params", "0.8", "--study", storage, "--study-name", "worker", "--heartbeat", "2"],
        world["source"], [output])
    worker = Command("tune-worker", ["tune-worker", storage, "--study-name", "worker", "--wait", "60",
                                     "--work-dir", str(work)], world["source"], [output])
    return compress, worker, study


def test_killed_worker_then_rerun_is_identical(world):
    """tune-worker killed at a point of its own (a log line or a moment), then started again: the search
    finishes, the compress command beside it writes the model an uninterrupted search writes (its trials'
    plans do not depend on who ran them), and the killed worker's trial models are gone."""
    name = "tune-worker"
    if ONLY and name not in ONLY:
        pytest.skip("not among STREAMROM_KILL_COMMANDS")
    compress, worker, study = worker_scene(world)
    work = Path(worker.args[worker.args.index("--work-dir") + 1])
    env = {k: v for k, v in os.environ.items() if k != "STREAMROM_FAULT"}

    def clear() -> None:
        shutil.rmtree(compress.outputs[0], ignore_errors=True)
        study.unlink(missing_ok=True)

    def together(line: int | None = None, seconds: float | None = None) -> tuple[subprocess.CompletedProcess, int, int]:
        """The compress command with the worker beside it; the worker killed at the point, if one is given,
        then run again to the end. Returns the compress run, the worker's exit status (the rerun's after a
        kill) and the worker's log lines."""
        clear()
        leader = subprocess.Popen(compress.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        try:
            if line is None and seconds is None:
                ran = run_to_end(worker)
                status, lines = ran.returncode, len(ran.stderr.splitlines())
            else:
                run_and_kill(worker, line=line, seconds=seconds)
                again = run_to_end(worker)
                status, lines = again.returncode, len(again.stderr.splitlines())
            _, err = leader.communicate(timeout=600)
        finally:
            if leader.poll() is None:
                leader.kill()
                leader.wait()
        return subprocess.CompletedProcess(leader.args, leader.returncode, "", err), status, lines

    clear()
    alone = run_to_end(compress)
    assert alone.returncode == 0, alone.stderr[-2000:]
    expected = digest(compress.outputs[0])
    if FULL:
        start = time.monotonic()
        leader, status, lines = together()
        seconds = time.monotonic() - start
        assert leader.returncode == 0 and status == 0, leader.stderr[-2000:]
        assert digest(compress.outputs[0]) == expected  # a worker beside it changes nothing either
        points = [("line", n) for n in range(lines + 1)] + [
            ("seconds", round(seconds * k / (MOMENTS + 1), 2)) for k in range(1, MOMENTS + 1)]
    else:  # the default run: the worker's fifth line (its first trial's first block written)
        points = [("line", 5)]
    results = []
    for kind, value in points:
        source_before = digest(world["source"])
        leader, status, _ = together(**{kind: value})
        assert leader.returncode == 0, f"compress beside a killed worker: {leader.stderr[-1500:]}"
        assert status == 0, f"tune-worker rerun after a kill at {kind} {value}: exit {status}"
        found = digest(compress.outputs[0])
        assert found == expected, f"kill at {kind} {value}: {sorted(set(found.items()) ^ set(expected.items()))[:4]}"
        assert leftovers(compress) == [], leftovers(compress)
        assert [p.name for p in work.iterdir()] == [], f"kill at {kind} {value}: left in --work-dir: {list(work.iterdir())}"
        assert digest(world["source"]) == source_before
        results.append((kind, value, "identical"))
    if TABLE:
        table = json.loads(Path(TABLE).read_text()) if Path(TABLE).is_file() else {}
        table[name] = {"log lines": lines, "uninterrupted seconds": round(seconds, 2),
                       "points": [list(point) for point in results]}
        Path(TABLE).write_text(json.dumps(table, indent=1) + "\n")
