"""Result pages are written by their benchmark scripts from the results JSON, never edited by hand: each
committed page must equal what its script writes now."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_result_says_which_run_made_it():
    """Issue 33: each result file carries the shared header (benchmark, command, commit, date, machine),
    at its top or on each of its rows."""
    from benchmarks.common import header_problems

    found = {path.name: header_problems(json.loads(path.read_text()))
             for path in (REPO / "benchmarks" / "results").glob("*.json")}
    assert len(found) > 30
    assert {name: problems for name, problems in found.items() if problems} == {}


def test_a_result_that_does_not_say_its_run_is_named(tmp_path):
    from benchmarks.common import ResultRows, header, header_problems

    run = header("quality.grid")
    assert header_problems({"header": run}) == []
    assert header_problems({"header": {**run, "commit": ""}}) == ["header: no commit"]
    assert header_problems({"header": {**run, "commit": "HEAD"}}) == ["header: commit 'HEAD' is not a commit"]
    assert header_problems({"header": {**run, "reconstructed": {"speed": "guessed"}}}) == [
        "header: reconstructed must map header fields to where each came from"]
    assert header_problems({"rows": [{"run": run}, {"perplexity": 1.0}]}) == ["row 1: no header"]
    assert header_problems({"benchmark": "quality.grid", "machine": run["machine"]}) == ["neither a header nor rows"]

    # rows a run adds get its header; rows kept from an earlier run keep theirs
    path = tmp_path / "rows.json"
    first = ResultRows(path, "quality.levers", 4)
    first.rows["a"] = {"key": "a", "perplexity": 1.0}
    first.save()
    earlier = {**json.loads(path.read_text())["rows"][0]["run"], "date": "2026-01-01 00:00:00 UTC"}
    kept = json.loads(path.read_text())
    kept["rows"][0]["run"] = earlier
    path.write_text(json.dumps(kept))
    second = ResultRows(path, "quality.levers", 4)
    second.rows["b"] = {"key": "b", "perplexity": 2.0}
    second.save()
    rows = json.loads(path.read_text())["rows"]
    assert [row["key"] for row in rows] == ["a", "b"]
    assert rows[0]["run"] == earlier and rows[1]["run"]["date"] != earlier["date"]
    assert header_problems(json.loads(path.read_text())) == []

    # a benchmark keeps `results.rows` as its table: rows it adds after a save are written by the next;
    # rows another run wrote to the file meanwhile are kept, this run's own win
    third = ResultRows(path, "quality.levers", 4)
    table = third.rows
    table["b"] = {"key": "b", "perplexity": 2.5}
    third.save()
    beside = ResultRows(path, "quality.levers", 4)
    beside.rows["c"] = {"key": "c", "perplexity": 3.0}
    beside.rows["b"] = {"key": "b", "perplexity": 9.0}
    beside.save()
    table["d"] = {"key": "d", "perplexity": 4.0}
    third.save()
    rows = {row["key"]: row["perplexity"] for row in json.loads(path.read_text())["rows"]}
    assert rows == {"a": 1.0, "b": 2.5, "c": 3.0, "d": 4.0}
    assert table is third.rows and set(table) == set(rows)
    # a file of another window count is not read
    assert ResultRows(path, "quality.levers", 8).rows == {}


def test_frontier_page_is_what_its_script_writes():
    from benchmarks.quantization import frontier

    found = [json.loads(p.read_text()) for p in sorted((REPO / "benchmarks" / "results").glob("frontier_*.json"))]
    assert found, "no frontier results"
    assert (REPO / "docs" / "results" / "frontier.md").read_text() == frontier.page(found) + "\n"


def test_reliability_page_is_what_its_script_writes():
    from benchmarks.reliability import sweep as reliability_sweep

    result = REPO / "benchmarks" / "results" / "reliability_sweep.json"
    if not result.is_file():
        return  # not run yet: no page either
    assert (REPO / "docs" / "reliability.md").read_text() == reliability_sweep.page(json.loads(result.read_text())) + "\n"


def test_an_empty_generated_table_is_filled_and_the_next_one_kept(monkeypatch):
    """A new section's marks with nothing between them get their table; the render never reaches past
    the next table's marks (it once swallowed everything up to the next table's end)."""
    from benchmarks import tables

    monkeypatch.setitem(tables.TABLES, "first", lambda: "| one |")
    monkeypatch.setitem(tables.TABLES, "second", lambda: "| two |")
    start, end = tables.START.format(name="{}"), tables.END
    text = f"a\n{start.format('first')}\n{end}\nkept prose\n{start.format('second')}\n| old |\n{end}\nz\n"
    assert tables.render(text) == (f"a\n{start.format('first')}\n| one |\n{end}\nkept prose\n"
                                   f"{start.format('second')}\n| two |\n{end}\nz\n")


def test_generated_tables_are_what_the_script_writes():
    """Every table a result page marks as generated equals what benchmarks/tables.py writes now from the
    results JSON (the scale page and the real-model grids have them)."""
    from benchmarks import tables

    marked = {}
    for page in sorted((REPO / "docs" / "results").glob("*.md")):
        text = page.read_text()
        marked[page.name] = tables.generated_names(text)
        assert tables.render(text) == text, f"{page.name}: a generated table differs (python -m benchmarks.tables)"
    assert "scale" in marked["scale.md"] and {"factored", "structured", "anchored", "inference", "speed", "load", "targeted", "general", "real-model"} <= set(marked["real-model.md"])
