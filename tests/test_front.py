"""An ensemble's front (``enserve.front`` in its config): nested points read, refused with the rule
they break, written by an import and read back."""

from __future__ import annotations

import json

import pytest

from enserve.server.errors import RepositoryError
from enserve.server.served.front import FrontPoint, front_text, parse_front, whole

MEMBERS = ["a", "b", "c"]


def test_a_front_reads_as_nested_points():
    text = json.dumps([{"members": ["b"], "cost_s": 0.04, "val_error": 0.03},
                       {"members": ["b", "c"], "cost_s": 0.09, "val_loss": 0.1},
                       {"members": ["c", "a", "b"]}])
    points = parse_front(text, MEMBERS, "ensemble 'e'")
    assert points == (FrontPoint(("b",), 0.04, 0.03), FrontPoint(("b", "c"), 0.09, None, 0.1),
                      FrontPoint(("c", "a", "b")))
    assert parse_front(front_text(points), MEMBERS, "e") == points  # written as read
    assert whole(MEMBERS) == (FrontPoint(("a", "b", "c")),)


@pytest.mark.parametrize("front, message", [
    ("[{", "enserve.front is not JSON"),
    ("[]", "must be a non-empty JSON list of points"),
    ('{"members": ["a"]}', "must be a non-empty JSON list of points"),
    ('[{"members": []}]', "point 0 must be an object with a non-empty list of member names"),
    ('[{"members": ["a", 3]}]', "point 0 must be an object with a non-empty list of member names"),
    ('[{"members": ["a", "z"]}]', "point 0 names ['z'], which are not members of the ensemble ['a', 'b', 'c']"),
    ('[{"members": ["a", "a", "b", "c"]}]', "point 0 names a member twice"),
    ('[{"members": ["a", "b", "c"], "cost": 1}]', "point 0 has unknown keys ['cost']"),
    ('[{"members": ["a", "b", "c"], "cost_s": -1}]', "point 0: cost_s is -1, but must be a finite number >= 0"),
    ('[{"members": ["a", "b", "c"], "val_error": 1.5}]', "point 0: val_error is 1.5, but must be a number in [0, 1]"),
    ('[{"members": ["a", "b", "c"], "val_loss": true}]', "point 0: val_loss is true, but must be a finite number"),
    ('[{"members": ["a", "b", "c"], "cost_s": 1' + "0" * 400 + '}]', "point 0: cost_s is 1000"),
    ("[" * 100000, "nests too deeply"),
    ('[{"members": ["a", "b"]}, {"members": ["a", "c"]}]', "point 1 (['a', 'c']) must hold every member of point 0"),
    ('[{"members": ["a", "b"]}, {"members": ["a", "b"]}]', "and at least one more: the points are nested"),
    ('[{"members": ["a"]}, {"members": ["a", "b"]}]', "last point must hold every member; it lacks ['c']"),
])
def test_a_bad_front_is_refused_with_its_rule(front, message):
    with pytest.raises(RepositoryError, match="ensemble 'e'") as info:
        parse_front(front, MEMBERS, "ensemble 'e'")
    assert message in str(info.value)


def test_an_imported_front_is_in_the_config_and_read_back(tmp_path):
    from enserve.models.synthetic import write_tiny_cnns
    from enserve.server.served.importer import import_onnx
    from enserve.server.served.repository import load_repository

    files = write_tiny_cnns(tmp_path / "onnx", (8, 16, 24))
    front = [FrontPoint(("cnn_w16",), 0.01, 0.2), FrontPoint(("cnn_w16", "cnn_w8"), 0.02, 0.1),
             FrontPoint(("cnn_w16", "cnn_w8", "cnn_w24"), 0.05, 0.05)]
    names = [f.stem for f in files]
    assert sorted(names) == ["cnn_w16", "cnn_w24", "cnn_w8"]
    import_onnx(files, tmp_path / "repo", front=front)
    text = (tmp_path / "repo" / "ensemble" / "config.pbtxt").read_text()
    assert "enserve.front" in text  # a plain-text parameter any client reads from ModelConfig
    spec = load_repository(tmp_path / "repo").ensembles["ensemble"]
    assert spec.front == tuple(front) and spec.points() == tuple(front)
    assert "enserve.front" not in spec.notes
    with pytest.raises(RepositoryError, match="last point must hold every member"):
        import_onnx(files, tmp_path / "repo2", front=front[:2])


def test_enserve_import_orders_a_front_by_name_or_by_measured_cost(tmp_path):
    import subprocess
    import sys

    from enserve.models.synthetic import write_tiny_cnns
    from enserve.server.served.repository import load_repository

    files = [str(f) for f in write_tiny_cnns(tmp_path / "onnx", (64, 8))]

    def run(repo: str, order: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "enserve", "import", *files, "--model-repository",
                               str(tmp_path / repo), "--front-order", order], capture_output=True, text=True,
                              timeout=120)

    done = run("cost", "cost")
    assert done.returncode == 0, done.stderr
    front = load_repository(tmp_path / "cost").ensembles["ensemble"].front
    assert [p.members for p in front] == [("cnn_w8",), ("cnn_w8", "cnn_w64")]  # the narrow one is cheaper
    assert 0 < front[0].cost_s < front[1].cost_s
    done = run("named", "cnn_w64,cnn_w8")
    assert done.returncode == 0, done.stderr
    front = load_repository(tmp_path / "named").ensembles["ensemble"].front
    assert [p.members for p in front] == [("cnn_w64",), ("cnn_w64", "cnn_w8")] and front[0].cost_s is None
    done = run("bad", "cnn_w64")
    # a usage error (2), refused from the file names before anything is read or written
    assert done.returncode == 2 and "--front-order 'cnn_w64': the front's order ['cnn_w64'] must name every member once" in done.stderr
    assert not (tmp_path / "bad").exists()
