"""Saving is atomic at every instant: crash the save at every step (a real ``os._exit`` in a forked
child, so no cleanup code runs, as with ``kill -9``) and check what is left."""

import os
from pathlib import Path

import pytest

from conftest import held_by_another_run
from prunekit.errors import ConfigError
from prunekit.formats import atomic
from prunekit.formats.atomic import atomic_folder, reserve_output, step

FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _writer(version: str):
    def write(tmp: Path) -> None:
        for name in FILES:
            step(f"file:{name}")
            (tmp / name).write_text(version)
    return write


def _state(out: Path) -> str:
    if not out.exists():
        return "absent"
    texts = {(out / f).read_text() if (out / f).exists() else None for f in FILES}
    return texts.pop() if len(texts) == 1 and None not in texts else f"mixed {sorted(map(str, texts))}"


def _crash_at(target: str, fn) -> int:
    pid = os.fork()
    if pid == 0:  # the child dies at ``target`` without running any cleanup
        atomic.FAULT = lambda s: os._exit(7) if s == target else None
        try:
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


NEW = ["write", *(f"file:{f}" for f in FILES), "rename"]
EXCHANGE = ["write", *(f"file:{f}" for f in FILES), "exchange", "remove-old"]
FALLBACK = ["write", *(f"file:{f}" for f in FILES), "exchange", "rename-old", "rename-new", "remove-old"]


@pytest.mark.parametrize("at", NEW)
def test_crash_while_creating_leaves_nothing_or_the_new_folder(tmp_path, at):
    out = tmp_path / "model"
    assert _crash_at(at, lambda: atomic_folder(out, _writer("new"))) == 7
    assert _state(out) == "absent"  # every step before the rename: the target never existed
    atomic_folder(out, _writer("again"))
    assert _state(out) == "again" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("at", EXCHANGE)
def test_crash_while_overwriting_leaves_the_old_or_the_new_folder(tmp_path, at):
    out = tmp_path / "model"
    atomic_folder(out, _writer("old"))
    assert _crash_at(at, lambda: atomic_folder(out, _writer("new"), overwrite=True)) == 7
    assert _state(out) == ("new" if at == "remove-old" else "old")
    atomic_folder(out, _writer("again"), overwrite=True)  # the next run cleans what the crash left
    assert _state(out) == "again" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("at", FALLBACK)
def test_without_an_atomic_exchange_the_next_run_restores_the_old_folder(tmp_path, at, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # e.g. a file system without RENAME_EXCHANGE
    out = tmp_path / "model"
    atomic_folder(out, _writer("old"))
    assert _crash_at(at, lambda: atomic_folder(out, _writer("new"), overwrite=True)) == 7
    expected = {"rename-new": "absent", "remove-old": "new"}.get(at, "old")
    assert _state(out) == expected
    with reserve_output(out, overwrite=True):  # the next run for this target, before it writes anything
        assert _state(out) == ("old" if expected == "absent" else expected)
    assert _leftovers(tmp_path) == []


def test_a_second_run_to_the_same_output_fails_at_once(tmp_path):
    out = tmp_path / "model"
    with held_by_another_run(out) as pid:
        with pytest.raises(ConfigError, match=rf"--out '{out}' is being written by another prunekit run \(process {pid}\)"):
            with reserve_output(out):
                pass
    with reserve_output(out):  # free again once the other run is done
        pass


def test_interrupted_write_removes_its_temporary_folder(tmp_path):
    def write(tmp):
        (tmp / "part").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_folder(tmp_path / "model", write)
    assert list(tmp_path.iterdir()) == []


def test_a_live_runs_temporary_folder_is_left_alone(tmp_path):
    out = tmp_path / "model"
    mine = tmp_path / f".model.tmp-{os.getppid()}-abc"  # the parent process is alive
    mine.mkdir()
    dead = tmp_path / ".model.tmp-999999-abc"
    dead.mkdir()
    atomic_folder(out, _writer("new"))
    assert mine.exists() and not dead.exists()
