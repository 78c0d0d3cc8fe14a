"""The shared bayes search (compression/study.py): real worker processes on one optuna storage, SQLite and a real
PostgreSQL server, a worker killed by SIGKILL mid-trial, a study resumed after every worker died.

Tiny random-weight models: these tests check scheduling, files and control flow, not accuracy."""
from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from streamrom.storage.checkpoint import CheckpointReader
from streamrom.errors import EXIT_INPUT, EXIT_USAGE

optuna = pytest.importorskip("optuna")

TRIALS = 7
BLOCKS = 3


def compress_command(source: Path, output: Path, tokens: Path, storage: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "streamrom.cli", "--quiet", "--threads", "1", "compress", str(source), str(output),
            "--calib-tokens", str(tokens), "--calib-sequences", "8", "--calib-seqlen", "64", "--chunk-tokens", "128",
            "--method", "rom", "--allocate", "bayes", "--target-params", "0.7", "--trials", str(TRIALS), "--study", storage,
            "--study-name", "tiny", "--heartbeat", "2", *extra]


def worker_command(storage: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "streamrom.cli", "--quiet", "--threads", "1", "tune-worker", storage,
            "--study-name", "tiny", "--wait", "60", *extra]


def start(command: list[str], fault: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "STREAMROM_FAULT"}
    if fault:
        env["STREAMROM_FAULT"] = fault
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def trials_by_state(storage: str) -> dict[str, list]:
    study = optuna.load_study(study_name="tiny", storage=storage)
    states: dict[str, list] = {}
    for trial in study.trials:
        states.setdefault(trial.state.name, []).append(trial)
    return states


def check_finished_study(storage: str, output: Path, dead_workers: int) -> list:
    """The study has exactly its trials done, each dead worker's trial run again, and the output is the
    best trial's plan."""
    states = trials_by_state(storage)
    complete = states["COMPLETE"]
    # a dead worker's trial run again may come on top of the others (its retry is queued when found dead)
    assert TRIALS <= len(complete) <= TRIALS + 2 * dead_workers
    assert len(states.get("FAIL", [])) == dead_workers
    retried = [trial for trial in complete if "failed_trial" in trial.system_attrs]
    # the dead workers' points, run again by the living (two workers finding one dead trial at the same
    # moment may both queue it again; a retry whose worker died too is retried under its first number)
    first = {t.number: t.system_attrs.get("failed_trial", t.number) for t in states.get("FAIL", [])}
    assert {trial.system_attrs["failed_trial"] for trial in retried} == set(first.values())
    for failed in states.get("FAIL", []):
        assert any(trial.params == failed.params and trial.system_attrs["failed_trial"] == first[failed.number]
                   for trial in retried)
    report = json.loads((output / "streamrom-report.json").read_text())
    scores = report["settings"]["bayes"]["scores"]
    assert sorted(trial["trial"] for trial in scores) == sorted(trial.number for trial in complete)
    best = min(complete, key=lambda trial: (trial.value, trial.number))
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert study.user_attrs["chosen_trial"] == best.number
    for key, rank in best.user_attrs["ranks"].items():
        assert report["ranks"].get(key) == rank, key
    assert report["settings"]["bayes"]["study_name"] == "tiny"
    assert abs(report["parameters_after"] / report["parameters_before"] - 0.7) < 0.05
    CheckpointReader(output)  # a complete checkpoint
    return complete


def test_workers_share_the_study_and_a_killed_workers_trial_runs_again(tiny_models, tiny_tokens, tmp_path):
    """Round 1: the compress command and a worker both die by SIGKILL in the middle of a trial (every
    worker dead; the later to start its trial may already have found the other's dead, on this machine,
    and run its point again). Round 2: the same command and a new worker resume the study: the dead
    trials are failed at once (their processes are gone) and their points run again; the two processes
    share the work. (A live worker taken for dead on an overloaded machine would add a FAIL: the
    heartbeat is 2 s.)"""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    source, output = tiny_models["llama"], tmp_path / "out"
    command = compress_command(source, output, tiny_tokens, storage)
    first = start(command, fault="during-bayes-trial")
    # a worker killed by SIGKILL cannot remove its trial folder: keep it inside tmp_path, not the system's
    doomed = start(worker_command(storage, "--work-dir", str(tmp_path / "doomed")), fault="during-bayes-trial")
    assert finish(first)[0] == -signal.SIGKILL
    code, _, err = finish(doomed)
    assert code == -signal.SIGKILL, err
    states = trials_by_state(storage)
    assert len(states.get("RUNNING", [])) + len(states.get("FAIL", [])) == 2  # a trial per dead worker
    assert len(states.get("RUNNING", [])) >= 1  # the last to die: nobody was left to find it dead
    assert not (output / "model.safetensors.index.json").exists()

    resumed = start(command)
    worker = start(worker_command(storage, "--work-dir", str(tmp_path / "work")))
    code, _, err = finish(resumed)
    assert code == 0, err
    code, out, err = finish(worker)
    assert code == 0, err
    assert out.startswith("study tiny finished: ") and "best held-out perplexity" in out
    complete = check_finished_study(storage, output, dead_workers=2)
    assert len({trial.user_attrs["worker"] for trial in complete}) == 2  # both round-2 processes ran trials
    assert not any((tmp_path / "work").iterdir())  # the worker's trial folders are gone


def test_a_late_worker_finds_the_search_finished(tiny_models, tiny_tokens, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    code, _, err = finish(start(compress_command(tiny_models["llama"], tmp_path / "out", tiny_tokens, storage)))
    assert code == 0, err
    code, out, _ = finish(start(worker_command(storage)))
    assert code == 0 and out.strip().endswith("this worker ran 0")
    assert len(trials_by_state(storage)["COMPLETE"]) == TRIALS


def test_bad_studies_are_refused_in_one_line(tiny_models, tiny_tokens, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    missing = start(worker_command(storage)[:-2])  # without --wait
    code, _, err = finish(missing)
    assert code == EXIT_USAGE and "no study named 'tiny'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "study.db").exists()  # a worker joins: it never makes the file
    for url, said in (("not a url", "cannot open the study storage"),
                      (f"sqlite:///{tmp_path / 'no-such-folder' / 'study.db'}", "does not exist")):
        # said before the output folder is made (it held a progress file once)
        code, _, err = finish(start(compress_command(tiny_models["llama"], tmp_path / "bad", tiny_tokens, url)))
        assert code == EXIT_INPUT and said in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "bad").exists() and not (tmp_path / "no-such-folder").exists()
    without_bayes = compress_command(tiny_models["llama"], tmp_path / "o", tiny_tokens, storage)
    without_bayes[without_bayes.index("bayes")] = "spectrum"
    code, _, err = finish(start(without_bayes))
    assert code == EXIT_USAGE and "--study" in err and len(err.splitlines()) == 1
    unreachable = compress_command(tiny_models["llama"], tmp_path / "o", tiny_tokens,
                                   "postgresql+psycopg2://nobody@127.0.0.1:1/none")
    code, _, err = finish(start(unreachable))
    assert code == EXIT_INPUT and "cannot open the study storage" in err and len(err.splitlines()) == 1
    assert "password" not in err


def test_a_worker_with_another_source_is_refused(tiny_models, tiny_tokens, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    code, _, err = finish(start(compress_command(tiny_models["llama"], tmp_path / "out", tiny_tokens, storage)))
    assert code == 0, err
    code, _, err = finish(start(worker_command(storage, "--source", str(tiny_models["qwen2"]))))
    assert code == EXIT_INPUT and "the source checkpoint here is another one" in err and len(err.splitlines()) == 1
    code, _, err = finish(start(worker_command(storage, "--source", str(tmp_path / "nowhere"))))
    assert code == EXIT_INPUT and "--source" in err and len(err.splitlines()) == 1


# -- a real PostgreSQL server, from Debian's packages, started here


def _postgres_binaries() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


@pytest.fixture(scope="module")
def postgres_url():
    """A throw-away PostgreSQL cluster on a free loopback port (as the postgres user when run as root:
    the server refuses root), stopped afterwards. Skipped, with the reason, where it cannot start."""
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver is missing: pip install psycopg2-binary")
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server here (Debian: apt-get install postgresql)")
    prefix: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="streamrom-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)

    steps = [(str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "streamrom", "--no-sync"),
             (str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
              f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"),
             (str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "streamrom", "studies")]
    try:
        for step in steps:
            result = run(*step)
            if result.returncode != 0:
                pytest.skip(f"PostgreSQL did not start: {Path(step[0]).name}: "
                            f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
        yield f"postgresql+psycopg2://streamrom@127.0.0.1:{port}/studies"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_workers_share_a_study_on_a_postgresql_server(postgres_url, tiny_models, tiny_tokens, tmp_path):
    output = tmp_path / "out"
    compressing = start(compress_command(tiny_models["llama"], output, tiny_tokens, postgres_url))
    workers = [start(worker_command(postgres_url)) for _ in range(2)]
    code, _, err = finish(compressing)
    assert code == 0, err
    for worker in workers:
        code, _, err = finish(worker)
        assert code == 0, err
    complete = check_finished_study(postgres_url, output, dead_workers=0)
    assert len({trial.user_attrs["worker"] for trial in complete}) >= 2


def test_without_a_study_the_search_runs_in_process(tiny_models, tiny_tokens, tmp_path):
    """No storage, no optuna study left behind: the in-process search records its trials as before."""
    command = compress_command(tiny_models["llama"], tmp_path / "out", tiny_tokens, "x")
    cut = command.index("--study")
    command = command[:cut] + command[cut + 6:]
    command[command.index("--trials") + 1] = "2"
    code, _, err = finish(start(command))
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "streamrom-report.json").read_text())
    assert len(report["settings"]["bayes"]["scores"]) == 2 and "study_name" not in report["settings"]["bayes"]
    assert not list(tmp_path.glob("*.db"))


# -- the shared search under faults (reliability round three) ------------------------------------------
def test_a_corrupt_sqlite_file_is_one_line(tiny_models, tiny_tokens, tmp_path):
    database = tmp_path / "study.db"
    database.write_bytes(b"not a database, whatever its name says " * 200)
    code, _, err = finish(start(compress_command(tiny_models["llama"], tmp_path / "out", tiny_tokens,
                                                 f"sqlite:///{database}")))
    assert code == EXIT_INPUT and len(err.splitlines()) == 1, err
    assert "cannot open the study storage" in err
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_two_different_commands_on_one_study_name_are_refused(tiny_models, tiny_tokens, tmp_path):
    """A second command with other settings pointed at the same study (name and storage) would mix two
    searches: it is refused, and the first study is left as it was."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    code, _, err = finish(start(compress_command(tiny_models["llama"], tmp_path / "out", tiny_tokens, storage)))
    assert code == 0, err
    before = [(t.number, t.state.name, t.value) for t in optuna.load_study(study_name="tiny", storage=storage).trials]
    other = compress_command(tiny_models["llama"], tmp_path / "other", tiny_tokens, storage)
    other[other.index("--target-params") + 1] = "0.6"
    code, _, err = finish(start(other))
    assert code == EXIT_INPUT and len(err.splitlines()) == 1 and "other settings" in err, err
    after = [(t.number, t.state.name, t.value) for t in optuna.load_study(study_name="tiny", storage=storage).trials]
    assert after == before


def test_a_password_in_the_storage_url_is_never_shown(postgres_url, tiny_models, tiny_tokens, tmp_path):
    """The server trusts the connection, so the URL's password is not checked; it must appear in no
    message, log line, report or output file."""
    secret = "s3cret-pw-7f2a"
    url = postgres_url.replace("streamrom@", f"streamrom:{secret}@")
    output, log = tmp_path / "out", tmp_path / "run.log"
    command = compress_command(tiny_models["llama"], output, tiny_tokens, url)
    command[command.index("--quiet")] = f"--log-file={log}"
    code, out, err = finish(start(command))
    assert code == 0, err
    worker = finish(start(worker_command(url)))
    assert worker[0] == 0, worker[2]
    assert "***" in log.read_text()  # the URL is logged, masked
    for text in (out, err, worker[1], worker[2], log.read_text()):
        assert secret not in text
    for path in output.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    unreachable = compress_command(tiny_models["llama"], tmp_path / "o", tiny_tokens,
                                   f"postgresql+psycopg2://someone:{secret}@127.0.0.1:1/none")
    code, _, err = finish(start(unreachable))
    assert code == EXIT_INPUT and secret not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("said", ["Cannot tell a COMPLETE trial.", "Cannot tell a FAIL trial."])
def test_a_trial_finished_elsewhere_is_dropped_not_fatal(tmp_path, caplog, said):
    """A worker whose trial another process declared dead (its heartbeat late on an overloaded machine)
    and finished or failed meanwhile: optuna refuses the late result with a ValueError before its own
    update; the result is dropped with a warning and the worker goes on. Any other ValueError is
    raised."""
    import logging
    from types import SimpleNamespace

    import optuna

    from streamrom.compression.study import SharedSearch

    search = SharedSearch(f"sqlite:///{tmp_path / 'study.db'}", "s", create=True, trials=1, heartbeat_seconds=2)
    calls = []

    def optimize(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError(said)
        search.study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))

    search.study.optimize = optimize
    space = SimpleNamespace(slots=[], num_layers=1, budget=0, base={})
    with caplog.at_level(logging.WARNING):
        search.run(space, lambda ranks: (1.0, {}))
    assert len(calls) == 2 and "taken for dead" in caplog.text
    search.study.optimize = lambda *a, **k: (_ for _ in ()).throw(ValueError("something else"))
    search.trials = 2
    with pytest.raises(ValueError, match="something else"):
        search.run(space, lambda ranks: (1.0, {}))


def test_a_dead_trial_of_this_machine_runs_again_at_once_and_keeps_its_place(tmp_path):
    """A command killed mid-trial, then rerun at once (the kill sweep's compress --study): the dead
    trial's process on this machine is gone, so its point is queued again without waiting three
    heartbeats, and it keeps its place among the search's trials: the rerun finishes with the points an
    uninterrupted search runs, not a later startup point in its stead (which changed the written model
    when the rerun's timing let the later point go first)."""
    import threading
    from datetime import datetime

    from streamrom.compression.study import PROCESS, SearchSpace, SharedSearch
    from streamrom.linalg.allocation import Slot
    from streamrom.linalg.bayes import search_groups

    slots = [Slot(f"model.layers.{block}.self_attn.{name}", block, 64, 64) for block in (0, 1)
             for name in ("q_proj", "k_proj")]
    space = SearchSpace(slots, budget=sum(slot.dense for slot in slots) // 2, base={s.key: 16 for s in slots},
                        num_layers=2)
    groups = search_groups(slots, 2)

    def finished_points(name: str, dead_first: bool) -> list[dict]:
        search = SharedSearch(f"sqlite:///{tmp_path / 'study.db'}", name, create=True, trials=3, heartbeat_seconds=60)
        search.publish({"arguments": "a", "source_fingerprint": "s", "source": "s"}, groups)
        if dead_first:  # trial 0 taken by a process that is gone since (SIGKILL leaves it RUNNING)
            gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
            trial = search.study.ask()
            trial.set_user_attr(PROCESS, {"machine": search.machine, "pid": int(gone.stdout), "trial": trial.number})
            assert search.study.trials[0].datetime_start <= datetime.now()
        runner = threading.Thread(target=search.run, args=(space, lambda ranks: (float(sum(ranks.values())), {})),
                                  daemon=True)
        runner.start()
        runner.join(timeout=60)  # without the check of the process, 180 s of heartbeats before the retry
        assert not runner.is_alive(), "the dead trial's point was not run again at once"
        complete = search.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        return sorted((trial.params for trial in complete), key=lambda p: sorted(p.items()))

    if sys.platform != "linux":
        pytest.skip("the machine's identity is read from /proc")
    uninterrupted = finished_points("whole", dead_first=False)
    assert finished_points("killed", dead_first=True) == uninterrupted
    assert len({tuple(sorted(p.items())) for p in uninterrupted}) == 3


def _small_space():
    from streamrom.compression.study import SearchSpace
    from streamrom.linalg.allocation import Slot
    from streamrom.linalg.bayes import search_groups

    slots = [Slot(f"model.layers.{block}.self_attn.{name}", block, 64, 64) for block in (0, 1)
             for name in ("q_proj", "k_proj")]
    space = SearchSpace(slots, budget=sum(slot.dense for slot in slots) // 2, base={s.key: 16 for s in slots},
                        num_layers=2)
    return space, search_groups(slots, 2)


def _run_to_the_end(search, space, timeout: float) -> list[dict]:
    import threading

    runner = threading.Thread(target=search.run, args=(space, lambda ranks: (float(sum(ranks.values())), {})),
                              daemon=True)
    runner.start()
    runner.join(timeout=timeout)
    assert not runner.is_alive(), "the search did not finish"
    complete = search.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    return sorted((trial.params for trial in complete), key=lambda p: sorted(p.items()))


def test_a_trial_killed_before_it_named_its_process_runs_again(tmp_path):
    """A worker killed between taking a trial and writing which process runs it (before its first
    heartbeat, too: optuna never counts a trial without one as stale): the rerun does not wait for it
    forever; once the heartbeats' grace has passed the trial is failed and its point run again, so the
    search ends with the points of an uninterrupted one."""
    from streamrom.compression.study import SharedSearch

    space, groups = _small_space()
    record = {"arguments": "a", "source_fingerprint": "s", "source": "s"}
    whole = SharedSearch(f"sqlite:///{tmp_path / 'whole.db'}", "s", create=True, trials=3, heartbeat_seconds=1)
    whole.publish(record, groups)
    uninterrupted = _run_to_the_end(whole, space, timeout=60)
    search = SharedSearch(f"sqlite:///{tmp_path / 'study.db'}", "s", create=True, trials=3, heartbeat_seconds=1)
    search.publish(record, groups)
    orphan = search.study.ask()  # RUNNING, with neither a heartbeat nor a process
    assert orphan.number == 0 and not search.study.trials[0].user_attrs
    assert _run_to_the_end(search, space, timeout=60) == uninterrupted
    failed = search.study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert [trial.number for trial in failed] == [0]


def test_a_rerun_queues_the_startup_points_a_killed_process_did_not(tmp_path):
    """The first process queues the seeded startup points one by one before it writes the study's
    record; killed between two of them, its rerun queues the rest in their order (not only when the
    study has no trial at all), so the search runs the points an uninterrupted one runs."""
    from streamrom.compression.study import STARTUP_TRIALS, SharedSearch
    from streamrom.linalg.bayes import startup_multipliers

    space, groups = _small_space()
    record = {"arguments": "a", "source_fingerprint": "s", "source": "s"}
    points = startup_multipliers(groups, 0, STARTUP_TRIALS)
    search = SharedSearch(f"sqlite:///{tmp_path / 'study.db'}", "s", create=True, trials=3, heartbeat_seconds=60)
    search.study.enqueue_trial(points[0])  # the killed process got this far
    search.publish(record, groups)
    queued = [trial.system_attrs["fixed_params"] for trial in search.study.trials]
    assert queued == points
    whole = SharedSearch(f"sqlite:///{tmp_path / 'whole.db'}", "s", create=True, trials=3, heartbeat_seconds=60)
    whole.publish(record, groups)
    assert _run_to_the_end(search, space, timeout=60) == _run_to_the_end(whole, space, timeout=60)


@pytest.mark.parametrize("field, value", [("format", 2), ("config", ""), ("source", 1.5), ("arguments", None),
                                          ("source_fingerprint", {}), ("base", True), ("base", {"a": 1}),
                                          ("base", {"model.layers.0.self_attn.q_proj": "8"}), ("orders", []),
                                          ("orders", {"model.layers.0.mlp.neurons": [1, None]})])
def test_a_study_record_of_another_shape_is_refused_in_one_line(tmp_path, field, value):
    """A worker reads the record another process wrote (another version's, or a damaged database's): a
    field of another shape is said when the record is read, naming it (fuzzed records reached internal
    errors: a source path that is a number, orders that are a list, a base plan that is a bool)."""
    from streamrom.compression.study import RECORD, SharedSearch
    from streamrom.errors import InputError

    search = SharedSearch(f"sqlite:///{tmp_path / 'study.db'}", "s", create=True, trials=2)
    good = {"format": 1, "config": {"ratio": 0.8}, "source": "/m", "source_fingerprint": "f", "arguments": "a",
            "base": {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.mlp.neurons": None},
            "orders": {"model.layers.0.mlp.neurons": [2, 0, 1]}}
    search.study.set_user_attr(RECORD, good)
    assert search.record() == good
    search.study.set_user_attr(RECORD, {**good, field: value})
    with pytest.raises(InputError, match=f"holds a record this streamrom cannot read \\(its {field}\\)"):
        search.record()
