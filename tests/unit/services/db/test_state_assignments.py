"""One state machine: nothing outside services/db/states.py sets ``Submission.state`` or ``Shard.state``.

The rule, checked on the source of services/, worker/ and evaluation/ (tests and their fixtures may
build rows in any state):

- no assignment to an attribute named ``state`` (``x.state = ...``, ``a.state, b = ...``,
  ``x.state += ...``) and no ``setattr(x, "state", ...)``;
- no ``state=`` keyword in a bulk write (``.values(state=...)``, ``.update(...)``, ``insert``) and no
  ``"state"`` key in a dict handed to one;
- allowed: a constructor keyword creating a *new* row in its initial state --
  ``Submission(..., state=SubmissionState.received)`` and ``Shard(..., state=ShardState.pending)``,
  plus the explicit exceptions in :data:`INITIAL_STATE_EXCEPTIONS` (rows imported in a later state);
- ``state=`` keywords of other calls (response models such as ``SubmissionLogs(state=...)``) are
  not writes and are ignored.

services/db/states.py itself (``transition``, ``shard_transition``, ``close_open_shards``) is the
one place allowed to write states.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
SCANNED = ("services", "worker", "evaluation")
STATE_MACHINE = ROOT / "services" / "db" / "states.py"
#: (constructor, initial state) allowed anywhere
INITIAL_STATES = {("Submission", "SubmissionState.received"), ("Shard", "ShardState.pending")}
#: (file, constructor, state): imported rows that enter in a later state
INITIAL_STATE_EXCEPTIONS = {
    ("services/importers.py", "Submission", "SubmissionState.published"),  # imported published results
}
BULK_WRITES = {"values", "update", "insert", "bulk_update_mappings", "bulk_insert_mappings"}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _targets(node: ast.AST):
    if isinstance(node, (ast.Tuple, ast.List)):
        for element in node.elts:
            yield from _targets(element)
    elif isinstance(node, ast.Starred):
        yield from _targets(node.value)
    else:
        yield node


def violations(path: Path) -> list[str]:
    relative = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=relative)
    found = []
    for node in ast.walk(tree):
        where = f"{relative}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for leaf in _targets(target):
                    if isinstance(leaf, ast.Attribute) and leaf.attr == "state":
                        found.append(f"{where}: assigns {ast.unparse(leaf)}")
        elif isinstance(node, ast.Call):
            func = _name(node.func)
            if func == "setattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                    and node.args[1].value == "state":
                found.append(f"{where}: setattr(..., 'state', ...)")
            for keyword in node.keywords:
                if keyword.arg != "state":
                    continue
                value = ast.unparse(keyword.value)
                if func in ("Submission", "Shard"):
                    if (func, value) not in INITIAL_STATES and (relative, func, value) not in INITIAL_STATE_EXCEPTIONS:
                        found.append(f"{where}: creates a {func} in state {value} (not its initial state)")
                elif func in BULK_WRITES:
                    found.append(f"{where}: bulk write of state ({func}(state={value}))")
            if func in BULK_WRITES:
                for arg in node.args:
                    if isinstance(arg, ast.Dict) and any(
                            isinstance(k, ast.Constant) and k.value == "state" for k in arg.keys):
                        found.append(f"{where}: bulk write of a 'state' key")
    return found


def _sources():
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != STATE_MACHINE and "tests" not in path.relative_to(ROOT).parts:
                yield path


def test_only_the_state_machine_writes_states():
    found = [v for path in _sources() for v in violations(path)]
    assert not found, ("set states through services/db/states.py (transition / shard_transition / "
                       "close_open_shards) only:\n" + "\n".join(found))


def test_the_check_sees_each_kind_of_write(monkeypatch):
    """The checker itself: every forbidden form is reported, the allowed ones are not."""
    sample = ROOT / "services" / "_state_check_sample.py"
    source = '''
shard.state = ShardState.running
shard.state, shard.finished_at = ShardState.cancelled, now
setattr(sub, "state", "failed")
session.execute(sa.update(Shard).values(state=ShardState.cancelled))
Shard(index=0, state=ShardState.failed)
Submission(state=SubmissionState.received)
Shard(index=0, state=ShardState.pending)
SubmissionLogs(state=submission.state)
'''
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    found = violations(sample)
    assert len(found) == 5, found
    assert all("_state_check_sample.py" in v for v in found)


def test_the_scan_covers_the_writers():
    """The files that once assigned states directly are among the scanned ones."""
    names = {p.relative_to(ROOT).as_posix() for p in _sources()}
    assert {"worker/validation.py", "worker/inference.py", "worker/reaper.py", "worker/pipeline.py",
            "services/importers.py", "services/submissions.py"} <= names
