"""Several machines share one study through an RDB: here two worker processes and a real local
PostgreSQL server that the test starts (initdb + pg_ctl as the postgres user) and stops."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("optuna", reason="the 'tune' extra is not installed")
pytest.importorskip("psycopg2", reason="psycopg2 (the 'tune' extra) is not installed")

from enserve.loadtest.launcher import free_ports  # noqa: E402


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def postgres_url():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed here (.ci/run installs Debian's postgresql)")
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a 'postgres' user to start PostgreSQL as")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    base = tempfile.mkdtemp(prefix="enserve-pg-")
    data = os.path.join(base, "data")
    os.chmod(base, 0o755)
    if as_postgres:
        shutil.chown(base, "postgres")
    (port,) = free_ports(1)
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    subprocess.run([*as_postgres, initdb, "-D", data, "-A", "trust", "-U", "postgres"], **run)
    subprocess.run([*as_postgres, pg_ctl, "-D", data, "-w", "-l", os.path.join(base, "log"), "-o",
                    f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"], **run)
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE enserve")
        conn.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/enserve"
    finally:
        subprocess.run([*as_postgres, pg_ctl, "-D", data, "-m", "fast", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_workers_share_a_study_in_postgresql(postgres_url, tmp_path):
    import optuna

    from enserve.tuning.library import read_records
    from tests.conftest import build

    lib = tmp_path / "library"
    build("digits", lib, storage=postgres_url, workers=2, time_budget_s=25, max_epochs=2,
                  pruner="hyperband", sampler="tpe", seed=0, max_trials=4, finish_fraction=0.0)  # the search alone
    study = optuna.load_study(study_name="enserve", storage=postgres_url)
    records = read_records(lib)
    assert len(study.trials) == len(records) >= 2
    assert study.user_attrs["pruner"] == "hyperband" and study.user_attrs["sampler"] == "tpe"
    assert {t.number for t in study.trials} == {r.number for r in records}


def test_two_builders_share_only_the_database_and_the_library(postgres_url, tmp_path):
    """The README's recipe for several machines: each runs ``enserve build`` with the same
    ``--storage`` URL and ``--library`` directory (here two separate processes); then one
    ``enserve select`` chooses the ensemble from every machine's trials."""
    import optuna
    import psycopg2

    from enserve.tuning.library import read_records

    conn = psycopg2.connect(postgres_url.replace("postgresql+psycopg2", "postgresql"))
    conn.autocommit = True
    conn.cursor().execute("CREATE DATABASE machines")  # a study of its own
    conn.close()
    postgres_url = postgres_url.rsplit("/", 1)[0] + "/machines"
    lib = tmp_path / "library"
    builders = [subprocess.Popen(
        [sys.executable, "-m", "enserve", "build", "--dataset", "digits", "--storage", postgres_url,
         "--library", str(lib), "--model-repository", str(tmp_path / f"repo{i}"), "--workers", "1",
         "--time-budget", "15s", "--max-epochs", "2", "--seed", "0", "--finish-fraction", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [b.communicate(timeout=240)[0] for b in builders]
    assert [b.returncode for b in builders] == [0, 0], outputs
    study = optuna.load_study(study_name="enserve", storage=postgres_url)
    workers = {t.user_attrs.get("worker") for t in study.trials}
    assert len({w.rsplit(":", 1)[1] for w in workers if w}) == 2, workers  # both processes trained trials
    drawn = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(drawn)) == len(drawn), drawn  # same --seed, yet no configuration drawn twice
    records = read_records(lib)
    assert {t.number for t in study.trials if t.state.is_finished()} == {r.number for r in records}
    final = tmp_path / "final"
    done = subprocess.run([sys.executable, "-m", "enserve", "select", "--library", str(lib),
                           "--model-repository", str(final)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    members = [p.parent.parent.name for p in final.glob("*/1/model.onnx")]
    assert members and (final / "ensemble" / "config.pbtxt").is_file(), members
    assert not list(final.rglob("engines")) and not list(final.rglob("model.plan"))  # no GPU: nothing unused
