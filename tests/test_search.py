"""Building a library with asynchronous successive halving (two worker processes sharing a journal),
then selecting an ensemble from it and serving it: the daemon's answer is the members' mean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("optuna", reason="the 'tune' extra is not installed")

from enserve.tuning.library import candidates, read_records, write_index  # noqa: E402
from tests.conftest import (  # noqa: E402
    ROOT,
    build,
    start_daemon,
)


def study_trials(storage: str) -> int:
    import optuna

    backend = optuna.storages.journal.JournalFileBackend(storage)
    return len(optuna.load_study(study_name="enserve", storage=optuna.storages.JournalStorage(backend)).trials)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    lib = tmp_path_factory.mktemp("lib") / "library"
    storage = build("digits", lib, workers=2, time_budget_s=25, max_epochs=3, pruner="asha",
                            sampler="random", seed=0, max_trials=6)
    write_index(lib, "digits")
    return lib, storage


def test_two_workers_build_a_library_and_a_rerun_continues(library):
    from enserve.tuning.finish import FINISHED_OFFSET

    lib, storage = library
    records = read_records(lib)
    searched = [r for r in records if r.number < FINISHED_OFFSET]
    assert len(searched) == study_trials(storage) >= 2
    for r in records[len(searched):]:  # finishing: a configuration trained to the end, or with another seed
        seed, number = divmod(r.number, FINISHED_OFFSET)
        origin = next(s for s in searched if s.number == number)
        assert r.state == "complete" and r.epochs == 3 and r.config == origin.config
        if seed == 1:  # the search's seed: only a configuration the search stopped early
            assert origin.state == "pruned" and r.message == f"trial {origin.number} trained to the end"
        else:
            assert r.message == f"trial {origin.number} trained to the end with seed {seed - 1}"
            replica, first = (np.load(lib / x.directory / "val_pred.npy") for x in (r, origin))
            assert not np.allclose(replica, first, atol=1e-3)  # another seed, another network
    assert {r.state for r in records} <= {"complete", "pruned", "failed"}
    for r in (r for r in records if r.state != "failed"):
        assert 1 <= r.epochs <= 3 and len(r.curve) == r.epochs and r.cost_s > 0 and r.parameters > 0
        assert (lib / r.directory / "model.onnx").is_file()
    index = json.loads((lib / "index.json").read_text())
    assert index["version"] == 1 and len(index["trials"]) == len(records)
    c = candidates(lib)
    assert c.val_preds.shape[1:] == (360, 10) and np.allclose(c.val_preds.sum(axis=2), 1, atol=1e-4)
    from enserve.tuning.build import progress_line
    from enserve.tuning.study import running_trials

    line = progress_line(lib, running=running_trials(storage))
    assert line.startswith("trials: 0 running, ") and "best single: trial" in line and "best ensemble:" in line
    before = study_trials(storage)
    build("digits", lib, workers=1, time_budget_s=8, max_epochs=3, seed=0, max_trials=before + 1)
    assert study_trials(storage) > before  # the same study, continued


def test_a_library_and_its_study_belong_to_one_data_set(library, tmp_path):
    import json
    import shutil

    lib, storage = library
    fp = json.loads((lib / "dataset.json").read_text())
    assert fp["name"] == "digits" and fp["split_seed"] == 0 and fp["classes"] == 10
    assert fp["shapes"]["x_val"] == [360, 1, 8, 8] and len(fp["train_sha256"]) == 64
    assert {r.data_sha256 for r in read_records(lib)} == {fp["train_sha256"]}
    rng = np.random.default_rng(0)
    other = tmp_path / "signals.npz"
    np.savez(other, x_train=rng.random((300, 40), dtype=np.float32), y_train=rng.integers(0, 3, 300))
    before = len(read_records(lib))
    with pytest.raises(ValueError, match=r"the library .*library belongs to data set 'digits': \d+ training samples "
                       r"of shape \(1, 8, 8\), 10 classes, .*; this build is on 'signals': 180 training samples of "
                       r"shape \(40,\), 3 classes.* build into another one \(--library DIR"):
        build(str(other), lib, workers=1, time_budget_s=5, max_epochs=1)
    with pytest.raises(ValueError, match=r"belongs to data set 'digits'.*split seed 0.*this build is on 'digits'.*"
                       r"split seed 1"):
        build("digits", lib, workers=1, time_budget_s=5, max_epochs=1, seed=1)
    assert len(read_records(lib)) == before  # refused before any training
    cli = subprocess.run([sys.executable, "-m", "enserve", "build", "--dataset", str(other), "--library", str(lib),
                          "--model-repository", str(tmp_path / "repo"), "--time-budget", "5s"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert cli.returncode == 2 and "belongs to data set 'digits'" in cli.stderr and "Traceback" not in cli.stderr
    with pytest.raises(ValueError, match=r"the study 'enserve' in .* was run on data set 'digits'.*this build is on "
                       r"'signals'.*cannot be compared"):
        build(str(other), tmp_path / "fresh", storage=storage, workers=1, time_budget_s=5, max_epochs=1)
    copy = tmp_path / "copy"
    shutil.copytree(lib, copy)
    record = next(f for f in sorted(copy.glob("trial_*/record.json")) if json.loads(f.read_text())["state"] != "failed")
    stranger = json.loads(record.read_text()) | {"data_sha256": "0" * 64}
    record.write_text(json.dumps(stranger))
    with pytest.raises(ValueError, match=rf"trials \[{stranger['number']}\] were trained on other data than the "
                       r"library's data set 'digits'"):
        candidates(copy)


def test_select_exports_a_servable_ensemble(library, tmp_path):
    import onnxruntime as ort

    from enserve.server.served.repository import load_repository
    from enserve.tuning.data import load_dataset

    lib, _ = library
    repo = tmp_path / "repo"
    out = subprocess.run([sys.executable, "-m", "enserve", "select", "--library", str(lib), "--model-repository",
                          str(repo), "--budget", "10", "--prune", "1.0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "best single model" in out.stdout and (lib / "pareto.png").is_file()
    assert "optimised offline by ONNX Runtime (extended level)" in out.stdout
    assert "TensorRT engines skipped: " in out.stdout  # this machine has neither TensorRT nor a GPU
    members = load_repository(repo).ensembles["ensemble"].members
    assert members and all(m.startswith("trial_") for m in members)
    x = load_dataset("digits").x_test[:5]
    # the reference: the library's own (unoptimised) exports, run directly
    expected = np.mean([ort.InferenceSession(str(lib / m / "model.onnx")).run(None, {"input": x})[0]
                        for m in members], axis=0)
    assert all((repo / m / "1" / "model.onnx").read_bytes() != (lib / m / "model.onnx").read_bytes() for m in members)
    daemon = start_daemon(repo, tmp_path)
    try:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_allclose(client.infer("ensemble", [inp]).as_numpy("probs"), expected, atol=1e-5)
    finally:
        assert daemon.stop() == 0


def test_augmentation_ranges_follow_the_image_size():
    import optuna

    from enserve.tuning.data import load_dataset
    from enserve.tuning.space import (
        SMALL_IMAGE_AUGMENTATION,
        TABLE5_AUGMENTATION,
        augmentation_bounds,
        suggest,
    )

    assert augmentation_bounds((3, 32, 32)) == TABLE5_AUGMENTATION  # the paper's CIFAR ranges
    assert augmentation_bounds((1, 8, 8)) == SMALL_IMAGE_AUGMENTATION
    assert TABLE5_AUGMENTATION.translation == 0.6 and TABLE5_AUGMENTATION.rotation == 90
    digits = load_dataset("digits")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    augs = []
    for _ in range(40):
        trial = study.ask()
        augs.append(suggest(trial, digits).augmentation)
        study.tell(trial, 0.0)
    b = SMALL_IMAGE_AUGMENTATION
    assert all(a.zoom <= b.zoom and a.translation <= b.translation and a.shear <= b.shear
               and a.channel_shift <= b.channel_shift and a.rotation <= b.rotation for a in augs)
    assert max(a.translation for a in augs) > b.translation / 2  # the range is searched, not pinned at 0


def test_build_refuses_bad_settings_with_the_value_and_the_rule(tmp_path):
    for flags, message in ((["--max-epochs", "0"], "--max-epochs is 0, but must be >= 1"),
                           (["--dataset", str(tmp_path / "none.npz")], "is neither 'digits' nor an existing path")):
        out = subprocess.run([sys.executable, "-m", "enserve", "build", "--time-budget", "5s", "--library",
                              str(tmp_path / "lib"), "--model-repository", str(tmp_path / "repo"), *flags],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_a_build_whose_trial_workers_cannot_start_stops_at_once_with_their_error(tmp_path):
    """Every ``python -m`` process on this machine dies at start-up (a broken site configuration,
    here a ``sitecustomize`` on PYTHONPATH), so the trial workers cannot start while ``enserve build``
    itself, a console script, can. Before, a build whose workers all died waited out its whole
    budget and said only 'no trained trial to select from'; now it stops within seconds, exit 1,
    with what the workers said."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if sys.argv[:1] == ['-m']:\n"
        "    sys.stderr.write('this machine cannot start python -m processes: the site is broken\\n')\n"
        "    sys.stderr.flush()\n"
        "    os._exit(3)\n")
    enserve = Path(sys.executable).parent / "enserve"
    t0 = time.monotonic()
    out = subprocess.run([str(enserve), "build", "--dataset", "digits", "--time-budget", "3m", "--library",
                          str(tmp_path / "lib"), "--model-repository", str(tmp_path / "repo")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=170,
                         env={**os.environ, "PYTHONPATH": str(site)})
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert took < 90, took  # not the 3 minute budget
    assert "enserve build: every trial worker died, so nothing was trained" in out.stderr
    assert "trial worker 0 exited with code 3" in out.stderr and "the site is broken" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_folder_named_enserve_where_a_build_starts_does_not_stand_in_for_the_package(tmp_path):
    """Children start with ``python -P``: the current directory is not on their path, so a folder
    called ``enserve`` there (the clone's root before the src layout, or a project of the user's)
    cannot shadow the installed package."""
    (tmp_path / "enserve").mkdir()
    (tmp_path / "enserve" / "__init__.py").write_text("raise ImportError('the shadow was imported')\n")
    from enserve.child import python_module

    probe = "import enserve.tuning.workers as w; print(w.__file__)"
    out = subprocess.run(python_module("enserve.child")[:-2] + ["-c", probe], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and "the shadow was imported" not in out.stderr, out.stderr
    assert str(tmp_path) not in out.stdout and out.stdout.strip().endswith("enserve/tuning/workers.py")


def test_signals_search_a_1d_residual_cnn_family(tmp_path):
    """An (N, 40) signal data set read with input kind 'signal' trains 1-D residual CNNs on a schedule
    chosen from the data: the library records a signal data set, the trials are ResNet1d, their
    ONNX models answer what the library predicted, and they learn (three wave frequencies; chance
    is 67 % error)."""
    import json

    import onnxruntime as ort

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    t = np.arange(40)
    x = np.sin(2 * np.pi * (y[:, None] + 1) * t / 20 + rng.random((600, 1)) * 6.28) + 0.3 * rng.standard_normal((600, 40))
    np.savez(tmp_path / "waves.npz", x_train=x.astype(np.float32), y_train=y)
    lib = tmp_path / "lib"
    schedules = []
    build(str(tmp_path / "waves.npz"), lib, workers=1, time_budget_s=25, max_trials=3, finish_fraction=0.0,
                  input_kind="signal", on_schedule=schedules.append)
    fp = json.loads((lib / "dataset.json").read_text())
    assert fp["kind"] == "signal" and fp["shapes"]["x_train"][1:] == [1, 40]
    (schedule,) = schedules  # from the data: 360 samples, batches 8-48, 13 steps an epoch
    assert (schedule.batch_low, schedule.batch_high) == (8, 48) and "360 training samples (13 steps" in schedule.why
    assert 3 <= schedule.max_epochs <= 77  # 1000 steps, unless the 25 s budget caps it
    records = [r for r in read_records(lib) if r.state != "failed"]
    assert all(r.epochs <= schedule.max_epochs for r in records)
    assert records and all(r.config["network_kind"] == "ResNet1dConfig" for r in records)
    from enserve.tuning.data import load_dataset

    data = load_dataset(str(tmp_path / "waves.npz"), input_kind="signal")
    for r in records:
        session = ort.InferenceSession(str(lib / r.directory / "model.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: data.x_val})[0]
        np.testing.assert_allclose(got, np.load(lib / r.directory / "val_pred.npy"), atol=1e-4)
    assert min(r.val_error for r in records) < 0.4, [r.val_error for r in records]


def test_error_and_cost_objective_is_what_asha_and_the_study_see(tmp_path):
    """With --objective error-and-cost every rung and the study's value are the validation loss plus
    the weighted cost over the study's reference cost, exactly; the records keep the plain loss for
    the selection; a study keeps its objective."""
    import optuna

    from enserve.tuning.study import make_storage

    rng = np.random.default_rng(2)
    np.savez(tmp_path / "rows.npz", x_train=rng.random((200, 12), dtype=np.float32), y_train=rng.integers(0, 2, 200))
    lib = tmp_path / "lib"
    storage = build(str(tmp_path / "rows.npz"), lib, workers=1, time_budget_s=15, max_epochs=2, finish_fraction=0.0,
                            max_trials=2, pruner="none", objective="error-and-cost", cost_weight=0.5)
    study = optuna.load_study(study_name="enserve", storage=make_storage(storage))
    goal = study.user_attrs["objective"]
    assert goal["kind"] == "error-and-cost" and goal["cost_weight"] == 0.5 and goal["cost_ref"] > 0
    records = {r.number: r for r in read_records(lib)}
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done
    for t in done:
        r = records[t.number]
        penalty = 0.5 * r.cost_s / goal["cost_ref"]
        assert t.value == pytest.approx(r.val_loss + penalty, rel=1e-9)
        assert t.intermediate_values[r.epochs] == pytest.approx(r.curve[-1]["val_loss"] + penalty, rel=1e-9)
    with pytest.raises(ValueError, match="minimises 'error-and-cost', not 'error'"):
        build(str(tmp_path / "rows.npz"), lib, workers=1, time_budget_s=5, max_epochs=2)


def test_the_same_seed_with_one_worker_gives_the_same_library(tmp_path):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "rows.npz", x_train=rng.random((160, 8), dtype=np.float32), y_train=rng.integers(0, 2, 160))
    libraries = []
    for k in range(2):
        lib = tmp_path / f"lib{k}"
        build(str(tmp_path / "rows.npz"), lib, workers=1, time_budget_s=30, max_epochs=2, max_trials=3, finish_fraction=0.0,
                      pruner="none", seed=5)
        libraries.append({r.number: (r.config["trial_params"], r.val_loss) for r in read_records(lib)})
    assert len(libraries[0]) == 3 and libraries[0] == libraries[1]


def test_sampler_seeds_repeat_on_one_machine_and_differ_between_builders_of_a_shared_study():
    from enserve.tuning.study import sampler_seed

    assert [sampler_seed(5, i, "/lib/study.journal") for i in range(3)] == [5000, 5001, 5002]
    shared = "postgresql://db/enserve"
    assert sampler_seed(5, 0, shared) == sampler_seed(5, 0, shared)  # this process
    child = subprocess.run([sys.executable, "-c", "from enserve.tuning.study import sampler_seed; "
                            f"print(sampler_seed(5, 0, '{shared}'))"], capture_output=True, text=True, check=True)
    assert int(child.stdout) != sampler_seed(5, 0, shared)  # another builder, same --seed


def test_on_a_terminal_a_build_shows_a_bar_over_its_time_budget(tmp_path):
    import fcntl
    import os
    import pty
    import re
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # a 200-column terminal
    proc = subprocess.Popen([sys.executable, "-m", "enserve", "build", "--time-budget", "6s", "--max-epochs", "1",
                             "--workers", "1", "--library", str(tmp_path / "lib"), "--model-repository",
                             str(tmp_path / "repo")], stdout=follower, stderr=follower, cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")})
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    out = b"".join(chunks).decode(errors="replace")
    assert proc.wait(120) == 0, out[-3000:]
    assert "schedule: up to 1 epochs a trial" in out
    assert re.search(r"\r\[#*\.*\] \d/6 s, \d s left; ", out), out[-2000:]  # redrawn in place
    assert re.search(r"\] \d/6 s, \d s left; trials: (\d+ running, )?\d+ finished, \d+ stopped early, \d+ failed",
                     out), repr(out[:1500])  # the whole line fits the terminal's 200 columns
    assert "ensemble 'ensemble' of " in out


def test_the_library_study_opens_in_optuna_dashboard(library):
    import json
    import time
    import urllib.request

    from enserve.loadtest.launcher import free_ports

    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is in the 'tune' extra")
    lib, storage = library
    (port,) = free_ports(1)
    command = str(Path(sys.executable).parent / "optuna-dashboard")  # the console script the README shows
    proc = subprocess.Popen([command, storage, "--port", str(port), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                studies = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5))
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "optuna-dashboard did not start"
                time.sleep(0.2)
        (study,) = [s for s in studies["study_summaries"] if s["study_name"] == "enserve"]
        detail = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}",
                                                  timeout=10))
        record = next(r for r in read_records(lib) if r.state == "complete")
        trial = next(t for t in detail["trials"] if t["number"] == record.number)
        params = {p["name"]: json.loads(p["param_external_value"]) if isinstance(p["param_external_value"], str)
                  and p["param_external_value"][:1] in "[{" else p["param_external_value"] for p in trial["params"]}
        assert set(params) == set(record.config["trial_params"])
        assert trial["values"] == [pytest.approx(record.val_loss)]
    finally:
        proc.terminate()
        proc.wait(10)
