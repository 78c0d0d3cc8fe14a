"""The bayes search shared by workers on any number of machines: an optuna study on a storage URL.

Every process that joins (the compress commands given `--study`, and `streamrom tune-worker`) runs
trials of the same search until it has `trials` completed ones, then stops. optuna does the
scheduling: the storage holds the trials, its Gaussian-process sampler proposes a point for each new
one knowing which are still running, and a heartbeat per running trial marks a worker dead after three
silent intervals; its trial is then failed and queued again (same point) for whichever worker is free.
A worker on the same machine (same kernel boot and process namespace) does not wait for the heartbeats:
a trial whose process is gone is failed and queued again at once, so a command rerun after a crash runs
its dead trial's point before the sampler proposes anything new (with only startup points, it finishes
with exactly the points an uninterrupted run has: tested). Where trials stand in the search (at most
`trials` of them count) goes by the number of the trial whose point they run, so a retried point keeps
its place.
A compress process that sees the search finished takes its best trial (the first to look writes the
choice into the study) and compresses with that plan.

The study also carries what a worker elsewhere needs to run a trial: the run's settings, the fingerprints
of the source and the calibration tokens (a worker whose copies differ is refused), and the base plan of
pass 1, which only the first compress process computes.

Storage: an SQLAlchemy URL that optuna's RDBStorage takes: sqlite:///FILE for workers on one machine,
postgresql://... or mysql://... for several (optuna's journal file has no heartbeats, so a dead worker's
trial would never come back: it is not offered).
"""
from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..linalg.allocation import Slot
from ..linalg.bayes import MULTIPLIER_RANGE, STARTUP_TRIALS, SearchResult, search_groups, startup_multipliers, \
    trial_ranks
from ..errors import InputError, UsageError

log = logging.getLogger(__name__)

RECORD = "streamrom"  # study attribute: settings, fingerprints, base plan
RECORD_FORMAT = 1  # the record's "format": what planning.study_record writes
CHOSEN = "chosen_trial"  # study attribute: the trial whose plan the compress processes write
HEARTBEAT = "heartbeat_seconds"  # study attribute: the interval every process judges the others by
PROCESS = "process"  # trial attribute: the machine, process id and trial number of the process that runs it
GRACE_HEARTBEATS = 3  # a running trial without a heartbeat for this many intervals belongs to a dead worker
OPEN_ATTEMPTS = 5
# what the loser of two processes creating a new storage's tables at once sees (SQLite, PostgreSQL)
CREATION_RACE = ("already exists", "UNIQUE constraint failed", "duplicate key value")
MAX_RETRIES = 3  # times one trial's point is queued again after its worker died


def default_name(arguments: str) -> str:
    """The study of one compression: the same command on every machine names the same study."""
    return f"streamrom-{arguments[:16]}"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def machine() -> str | None:
    """What makes a process id mean one process: the host, its kernel's boot and the process namespace
    (containers on one kernel have their own). None where the system does not say (then only heartbeats
    tell a dead worker)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{namespace}"


def process_gone(pid: int, since: float) -> bool:
    """Whether process `pid` of this machine, which was running at time `since`, has ended: no such
    process, or one started after `since` (the id was used again)."""
    import psutil

    try:
        return psutil.Process(pid).create_time() > since + 1.0  # create_time is rounded to the clock tick
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # another user's process: it exists
        return False


def check_storage(url: str) -> None:
    """Refuse, before any work or output, a storage URL that cannot be opened as written: optuna or the
    database's driver not installed, a URL that does not parse, a SQLite file in a folder that does not
    exist. (A server that does not answer is found when the study is opened.)"""
    try:
        import optuna  # noqa: F401  (the search needs it; said now, not after pass 1)
        from sqlalchemy.engine import make_url
    except ImportError:
        raise UsageError("--allocate bayes needs optuna: pip install 'streamrom[bayes]'") from None
    shown = _shown(url)
    try:
        parsed = make_url(url)
        parsed.get_dialect().import_dbapi()
    except ImportError as exc:
        raise UsageError(f"--study {shown}: {exc} (install the database driver)") from None
    except Exception as exc:
        raise InputError(f"cannot open the study storage {shown}: {_first_line(exc)}") from None
    database = _sqlite_file(url)
    if database is not None and not database.parent.is_dir():
        raise InputError(f"cannot open the study storage {shown}: folder {database.parent} does not exist")


def _sqlite_file(url: str) -> Path | None:
    """The file of a sqlite:/// URL (None for another database or an in-memory one)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


@dataclass(frozen=True)
class SearchSpace:
    """What each trial needs besides its point: the searched slots, their budget and the base plan."""

    slots: Sequence[Slot]
    budget: int
    base: Mapping[str, int | None]  # of the searched slots
    num_layers: int


class SharedSearch:
    """One optuna study on a storage URL, joined by this process.

    `trials` and `seed` are the search's (a worker that joins takes them from the study's record); the
    heartbeat interval is the study's, set by the process that creates it: every process must judge
    the others' silence by the same interval. A process that only joins (`create` false) waits up to
    `wait_seconds` for the study to appear."""

    def __init__(self, url: str, name: str, create: bool, trials: int = 0, seed: int = 0,
                 heartbeat_seconds: int = 60, wait_seconds: float = 0) -> None:
        try:
            import optuna
            from optuna.storages import RDBStorage
        except ImportError:
            raise UsageError("--allocate bayes needs optuna: pip install 'streamrom[bayes]'") from None
        try:  # optuna 4.9 renamed the callback that queues a dead worker's trial again
            from optuna.storages import RetryHeartbeatStaleTrialCallback as retry_class
            retry_option = "heartbeat_stale_trial_callback"
        except ImportError:
            from optuna.storages import RetryFailedTrialCallback as retry_class
            retry_option = "failed_trial_callback"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self._optuna = optuna
        self.name, self.trials, self.seed = name, trials, seed
        self.worker = worker_name()
        self.machine = machine()
        self.shown_url = _shown(url)
        self._unclaimed: dict[int, float] = {}  # running trials seen without their process: when first seen
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}

        def storage(heartbeat: int | None):
            for attempt in range(OPEN_ATTEMPTS):
                try:
                    retry = {retry_option: retry_class(max_retry=MAX_RETRIES)} if heartbeat else {}
                    return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat,
                                      grace_period=heartbeat and GRACE_HEARTBEATS * heartbeat, **retry)
                except ImportError as exc:  # the database's driver (psycopg2, pymysql) is not installed
                    raise UsageError(f"--study {self.shown_url}: {exc} (install the database driver)") from None
                except Exception as exc:  # a malformed URL, a server that does not answer, a file not writable
                    # processes starting together on a new storage race to create its tables: the
                    # loser's error (a table or its version row already there) is gone a moment later
                    if not any(sign in str(exc) for sign in CREATION_RACE) or attempt == OPEN_ATTEMPTS - 1:
                        raise InputError(f"cannot open the study storage {self.shown_url}: {_first_line(exc)}") \
                            from None
                    time.sleep(1.0)

        if not create:  # a worker that only joins never creates a SQLite file: it waits for the study's
            self._wait_for_file(url, name, wait_seconds)
        plain = storage(None)
        if create:
            study = optuna.create_study(storage=plain, study_name=name, direction="minimize", load_if_exists=True)
            if HEARTBEAT not in study.user_attrs:
                study.set_user_attr(HEARTBEAT, heartbeat_seconds)
        else:
            deadline = time.monotonic() + wait_seconds
            while True:
                try:
                    study = optuna.load_study(storage=plain, study_name=name)
                    break
                except KeyError:
                    if time.monotonic() >= deadline:
                        waited = f" after waiting {wait_seconds:g} s" if wait_seconds else ""
                        raise UsageError(f"no study named {name!r} in {self.shown_url}{waited}") from None
                    time.sleep(1.0)
        self.heartbeat_seconds = int(study.user_attrs.get(HEARTBEAT, heartbeat_seconds))
        # Points a worker's own sampler draws at random (before the Gaussian process has its startup
        # trials) differ between workers; the startup points themselves are queued once, seeded.
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=STARTUP_TRIALS,
                                            independent_sampler=optuna.samplers.RandomSampler())
        self.study = optuna.load_study(storage=storage(self.heartbeat_seconds), study_name=name, sampler=sampler)

    def _wait_for_file(self, url: str, name: str, wait_seconds: float) -> None:
        try:
            database = _sqlite_file(url)
        except Exception:  # not a URL: said as the storage is opened
            return
        deadline = time.monotonic() + wait_seconds
        while database is not None and not database.exists():
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait_seconds:g} s" if wait_seconds else ""
                raise UsageError(f"no study named {name!r} in {self.shown_url}: {database} does not exist{waited}")
            time.sleep(1.0)

    # -- what the study carries besides its trials

    def record(self) -> dict[str, Any] | None:
        """The study's record (None before the first process wrote it), checked to be of the shape this
        version writes: a worker elsewhere reads it, and nothing after this may meet a wrong type."""
        from .progress import is_orders, is_plan

        record = self.study.user_attrs.get(RECORD)
        if record is None:
            return None
        checks = {"format": isinstance(record, dict) and record.get("format") == RECORD_FORMAT}
        if checks["format"]:
            checks.update({"config": isinstance(record.get("config"), dict),
                           **{name: isinstance(record.get(name), str)
                              for name in ("source", "source_fingerprint", "arguments")},
                           "base": is_plan(record.get("base")), "orders": is_orders(record.get("orders", {}))})
        wrong = next((name for name, fine in checks.items() if not fine), None)
        if wrong is not None:
            raise InputError(f"study {self.name!r} in {self.shown_url} holds a record this streamrom cannot read "
                             f"(its {wrong}): made by another version, or damaged")
        return record

    def check(self, arguments: str, source: str) -> None:
        """Refuse to work on a study of another model, settings or calibration."""
        record = self.record()
        if record is None:
            return
        if record["source_fingerprint"] != source:
            raise InputError(f"study {self.name!r} compresses {record['source']} (as its first process saw it); "
                             "the source checkpoint here is another one (its config or tensor headers differ)")
        if record["arguments"] != arguments:
            raise InputError(f"study {self.name!r} was made with other settings or calibration tokens than this "
                             "process's (the calibration files or the streamrom version differ)")

    def publish(self, record: dict[str, Any], groups: Sequence[str]) -> None:
        """The first process's settings and base plan, and the search's seeded startup points."""
        if self.record() is not None:
            return
        # no trial runs before the record is there, so every trial is a queued startup point: a process
        # killed while it queued them left some, and its rerun queues the rest in their order (each point
        # once, whoever queued it first)
        for point in startup_multipliers(groups, self.seed, STARTUP_TRIALS):
            self.study.enqueue_trial(point, skip_if_exists=True)
        self.study.set_user_attr(RECORD, record)

    def wait_for_record(self) -> dict[str, Any]:
        """For a worker that joins before the first compress process finished pass 1."""
        waited = False
        while (record := self.record()) is None:
            if not waited:
                log.info("study %s: waiting for the first compress process to finish pass 1", self.name)
                waited = True
            time.sleep(self._poll_seconds())
        return record

    # -- the trials

    def run(self, space: SearchSpace, score: Callable[[dict[str, int | None]], tuple[float, dict]]) -> None:
        """Run trials until the study has its `trials` completed ones (others may run some meanwhile)."""
        optuna = self._optuna
        groups = search_groups(space.slots, space.num_layers)
        wanted = self.trials

        def objective(trial) -> float:
            # which process runs it, first: until then only the heartbeats' grace tells a dead worker's
            # trial, and the sampler's first suggestion (a Gaussian process's fit) can take a while
            trial.set_user_attr("worker", self.worker)
            trial.set_user_attr(PROCESS, {"machine": self.machine, "pid": os.getpid(), "trial": trial.number})
            # another worker took the last trial first (a dead worker's trial run again always runs: its
            # retry was queued after others may have started, and its point was promised)
            if not self._is_retry(trial.number) and self._position(trial.number) >= wanted:
                raise optuna.TrialPruned("the search has all its trials")
            multipliers = {group: trial.suggest_float(group, *MULTIPLIER_RANGE, log=True) for group in groups}
            if self._proposed_already(trial.number, multipliers):
                # two workers asked at the same moment, before either's point was stored: the later one
                # asks again, and the sampler then sees the other's point as running
                raise optuna.TrialPruned("another worker runs this point")
            log.info("bayes trial %d (study %s): compressing", trial.number, self.name)
            ranks = trial_ranks(space.slots, space.budget, space.base, multipliers, space.num_layers)
            value, seconds = score(ranks)
            trial.set_user_attr("ranks", ranks)
            trial.set_user_attr("seconds", seconds)
            done = self._count(optuna.trial.TrialState.COMPLETE) + 1
            log.info("bayes trial %d: held-out perplexity %.4f (%d/%d of the study done)", trial.number, value,
                     min(done, wanted), wanted, extra={"progress": (min(done, wanted), wanted, "bayes")})
            return value

        while True:
            self._fail_dead_workers_trials()
            states = [trial.state for trial in self.study.get_trials(deepcopy=False)]
            complete = states.count(optuna.trial.TrialState.COMPLETE)
            running = states.count(optuna.trial.TrialState.RUNNING)
            waiting = states.count(optuna.trial.TrialState.WAITING)
            if complete >= wanted:
                return
            if complete + running + waiting >= wanted and not waiting:
                time.sleep(self._poll_seconds())  # the last trials run elsewhere
                continue
            try:
                self.study.optimize(objective, n_trials=1, catch=(), gc_after_trial=False)
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as exc:
                # this worker's heartbeat came late (an overloaded machine) and another worker declared
                # its trial dead; the trial's point is queued again, so this result is dropped, not fatal.
                # optuna says so by one error or the other, as the other process got there before the
                # check of the trial's state or between the check and the update.
                if isinstance(exc, ValueError) and not str(exc).startswith("Cannot tell a "):
                    raise
                log.warning("study %s: a trial of this worker was taken for dead (its heartbeat came more than %d "
                            "s late) and is run again; its result here is dropped", self.name,
                            GRACE_HEARTBEATS * self.heartbeat_seconds)

    def result(self) -> SearchResult:
        """The finished search: its best trial (lowest score, then the earliest), fixed in the study by
        the first process that asks, and every completed trial."""
        complete = self.study.get_trials(deepcopy=False, states=(self._optuna.trial.TrialState.COMPLETE,))
        if not complete:
            raise InputError(f"study {self.name!r} has no completed trial")
        best = min(complete, key=lambda trial: (trial.value, trial.number))
        if CHOSEN not in self.study.user_attrs:
            self.study.set_user_attr(CHOSEN, best.number)
        chosen = next((trial for trial in complete if trial.number == self.study.user_attrs[CHOSEN]), best)
        trials = [{"trial": trial.number, "score": trial.value, "multipliers": trial.params,
                   "worker": trial.user_attrs.get("worker"), **trial.user_attrs.get("seconds", {})}
                  for trial in sorted(complete, key=lambda trial: trial.number)]
        return SearchResult(dict(chosen.user_attrs["ranks"]), chosen.value, trials)

    def _position(self, number: int) -> int:
        """Where trial `number` stands among the trials that count (done, running, queued): at most
        `trials` of them run, the earliest first, whatever the race between workers. A trial that runs a
        dead worker's point again stands where that point's first trial stood."""
        states = self._optuna.trial.TrialState
        counted = self.study.get_trials(deepcopy=False, states=(states.COMPLETE, states.RUNNING, states.WAITING))
        place = {trial.number: trial.system_attrs.get("failed_trial", trial.number) for trial in counted}
        mine = place.get(number, number)
        return sum(1 for other, its in place.items() if (its, other) < (mine, number))

    def _is_retry(self, number: int) -> bool:
        """Whether trial `number` runs again the point of a trial whose worker died."""
        return any(trial.number == number and "failed_trial" in trial.system_attrs
                   for trial in self.study.get_trials(deepcopy=False))

    def _proposed_already(self, number: int, multipliers: Mapping[str, float]) -> bool:
        running = self.study.get_trials(deepcopy=False, states=(self._optuna.trial.TrialState.RUNNING,))
        return any(other.number < number and other.params == multipliers for other in running)

    def _count(self, state) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(state,)))

    def _fail_dead_workers_trials(self) -> None:
        """Fail the running trials of dead workers and queue their points again: at once where the
        worker ran on this machine and its process is gone, after three silent heartbeats elsewhere, and
        three heartbeats after its start where the trial never said which process runs it."""
        optuna = self._optuna
        failed = []
        grace = GRACE_HEARTBEATS * self.heartbeat_seconds
        for trial in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            process = trial.user_attrs.get(PROCESS)
            # a retry carries its dead first trial's attributes until its own process writes its own
            own = isinstance(process, dict) and process.get("trial") == trial.number
            if trial.datetime_start is None:
                continue
            if not own:
                # a worker writes its process first thing in a trial (before the sampler's suggestion);
                # one killed before that (maybe before its first heartbeat, and a trial without one is
                # never stale to optuna) is taken for dead once this process has seen the trial unclaimed
                # for the heartbeats' grace (by its own clock: the machines' clocks may disagree)
                seen = self._unclaimed.setdefault(trial._trial_id, time.monotonic())
                if time.monotonic() - seen <= grace:
                    continue
            elif (self.machine is None or process.get("machine") != self.machine
                    or not process_gone(int(process["pid"]), trial.datetime_start.timestamp())):
                continue
            try:
                if self.study._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
                    failed.append((trial._trial_id, "process on this machine is gone" if own else
                                   f"worker never started it ({grace} s)"))
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another process got there first (or the trial finished after all)
        retry = self.study._storage.get_heartbeat_stale_trial_callback()
        for trial_id, why in failed:
            log.warning("study %s: trial %d's %s; its point is run again", self.name,
                        self.study._storage.get_trial_number_from_id(trial_id), why)
            if retry is not None:
                retry(self.study, self.study._storage.get_trial(trial_id))
        optuna.storages.fail_stale_trials(self.study)

    def _poll_seconds(self) -> float:
        return min(10.0, max(0.2, self.heartbeat_seconds / 2))


def _shown(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
