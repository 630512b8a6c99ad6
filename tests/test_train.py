import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from kmeansinit.cli import main
from kmeansinit.train import RunError, TrainConfig, lr_at, split_validation, train


def tiny(data, out, **kw):
    base = dict(data=str(data), out=str(out), width=0.25, batch_size=8, iterations=12, eval_every=6, log_every=3,
                checkpoint_every=4, init="he", init_images=16, threads=1)
    return TrainConfig(**{**base, **kw})


def test_lr_schedule_halves_at_two_thirds():
    assert lr_at(0, 1e-3, 75_000, 2 / 3) == 1e-3
    assert lr_at(49_999, 1e-3, 75_000, 2 / 3) == 1e-3
    assert lr_at(50_000, 1e-3, 75_000, 2 / 3) == 5e-4
    assert lr_at(200, 1e-3, 300, 2 / 3) == 5e-4 and lr_at(199, 1e-3, 300, 2 / 3) == 1e-3


def test_run_folder_contents_and_metrics_rows(fake_cifar10, tmp_path):
    cfg = tiny(fake_cifar10, tmp_path / "run", init="kmeans", init_options=dict(steps=1, refine_steps=1))
    last = train(cfg, progress=False)
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["init"] == "kmeans" and saved["resolved_iterations"] == 12 and saved["init_options"]["steps"] == 1
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    assert [r["lr"] for r in rows] == [1e-3, 1e-3, 5e-4, 5e-4]
    assert all("test_acc" in r for r in rows if r["step"] % 6 == 0)
    assert all("test_acc" not in r for r in rows if r["step"] % 6)
    assert all(math.isfinite(r["train_loss"]) for r in rows) and last == rows[-1]
    rep = json.loads((run / "init_report.json").read_text())
    assert rep["method"] == "kmeans" and len(rep["layers"]) == 8
    final = torch.load(run / "final.pt")
    assert "features.0.weight" in final
    with pytest.raises(RunError, match="already holds a run"):
        train(cfg, progress=False)


def test_epochs_override_iterations(fake_cifar10, tmp_path):
    cfg = tiny(fake_cifar10, tmp_path / "r", epochs=2, iterations=999)
    train(cfg, progress=False)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["resolved_iterations"] == 2 * (60 // 8)


def test_nan_loss_stops_and_keeps_checkpoint(fake_cifar10, tmp_path):
    cfg = tiny(fake_cifar10, tmp_path / "r", lr=1e30, optimizer="sgd", init="normal", init_options=dict(std=10.0))
    with pytest.raises(RunError, match="loss became"):
        train(cfg, progress=False)
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def _cli(data, out, extra=()):
    return [sys.executable, "-m", "kmeansinit", "train", "--data", str(data), "--out", str(out), "--width", "0.25",
            "--batch-size", "8", "--iterations", "16", "--checkpoint-every", "2", "--eval-every", "8",
            "--log-every", "2", "--init", "kmeans", "--init-option", "steps=1", "--init-option", "refine_steps=2",
            "--init-images", "16", "--threads", "1", "--quiet", *extra]


def wait_for(condition, seconds=120):
    """Poll ``condition()`` until it holds (exceptions count as not yet) or time runs out."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if condition():
                return True
        except Exception:
            pass
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(fake_cifar10, tmp_path):
    # An outside SIGKILL after a checkpoint (20 s, out of CI: tests/test_faults.py kills at three
    # injected moments in CI, all ten with -m slow).
    # Uninterrupted reference.
    subprocess.run(_cli(fake_cifar10, tmp_path / "ref"), check=True, capture_output=True)
    # Same run, SIGKILLed after a checkpoint past step 6, then resumed.
    env = dict(os.environ, KMEANSINIT_TEST_STEP_SLEEP="0.3")
    proc = subprocess.Popen(_cli(fake_cifar10, tmp_path / "cut"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ck = tmp_path / "cut" / "checkpoint.pt"
    wait_for(lambda: torch.load(ck, weights_only=False)["step"] >= 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "final.pt").exists(), "run finished before it could be killed"
    subprocess.run([sys.executable, "-m", "kmeansinit", "train", "--resume", str(tmp_path / "cut"), "--quiet"],
                   check=True, capture_output=True)
    a, b = torch.load(tmp_path / "ref" / "final.pt"), torch.load(tmp_path / "cut" / "final.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "wall"} for l in p.read_text().splitlines()]
    assert strip(tmp_path / "ref" / "metrics.jsonl") == strip(tmp_path / "cut" / "metrics.jsonl")


def test_resume_keeps_the_threads_given_now(fake_cifar10, tmp_path):
    # Threads are the resuming machine's setting: --threads N on --resume wins over the saved value,
    # and without it (0) the saved value applies.
    before = torch.get_num_threads()
    run = tmp_path / "run"
    try:
        train(tiny(fake_cifar10, run, threads=2), progress=False)
        (run / "final.pt").unlink()
        train(tiny(fake_cifar10, run, threads=1), resume=True, progress=False)
        assert torch.get_num_threads() == 1
        (run / "final.pt").unlink()
        train(tiny(fake_cifar10, run, threads=0), resume=True, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cli_one_line_errors(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err and "--download" in err
    assert main(["train", "--resume", str(tmp_path / "none"), "--quiet"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--init", "kaiming"])
    assert main(["train", "--data", str(tmp_path), "--lr", "-1", "--quiet"]) == 2
    assert "lr must be > 0" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_option_trains(fake_cifar10, tmp_path):
    # torch.compile takes about a minute here: marked slow, out of CI.
    last = train(tiny(fake_cifar10, tmp_path / "r", iterations=4, eval_every=4, compile=True), progress=False)
    assert math.isfinite(last["train_loss"]) and (tmp_path / "r" / "final.pt").exists()


def test_metrics_reach_tensorboard_writer(fake_cifar10, tmp_path, monkeypatch):
    """Runs in CI without tensorboard: a stand-in writer records what train() logs."""
    import kmeansinit.train as T

    logged = []

    class Writer:
        def add_scalar(self, key, value, step):
            logged.append((key, step, value))

        def flush(self):
            pass

        def close(self):
            logged.append(("closed", None, None))

    monkeypatch.setattr(T, "_tensorboard", lambda out: Writer())
    train(tiny(fake_cifar10, tmp_path / "r"), progress=False)
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert ("train_loss", r["step"], r["train_loss"]) in logged and ("lr", r["step"], r["lr"]) in logged
        if "test_acc" in r:
            assert ("test_acc", r["step"], r["test_acc"]) in logged
    assert logged[-1][0] == "closed"


def test_tensorboard_events_when_installed(fake_cifar10, tmp_path):
    pytest.importorskip("tensorboard")
    train(tiny(fake_cifar10, tmp_path / "r"), progress=False)
    assert list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_ctrl_c_leaves_a_resumable_run(fake_cifar10, tmp_path):
    # 18 s, out of CI: SIGINT and SIGTERM share one handler (train.py), and test_faults.py's SIGTERM
    # test (in CI) checks the checkpoint of the current step and the identical resume.
    subprocess.run(_cli(fake_cifar10, tmp_path / "ref"), check=True, capture_output=True)
    env = dict(os.environ, KMEANSINIT_TEST_STEP_SLEEP="0.3")
    proc = subprocess.Popen(_cli(fake_cifar10, tmp_path / "cut"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    wait_for(lambda: metrics.read_text().count("\n") >= 2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert f"kmeansinit train --resume {tmp_path / 'cut'}" in proc.stdout.read().decode()
    assert not (tmp_path / "cut" / "final.pt").exists()
    step = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < step < 16
    subprocess.run([sys.executable, "-m", "kmeansinit", "train", "--resume", str(tmp_path / "cut"), "--quiet"],
                   check=True, capture_output=True)
    a, b = torch.load(tmp_path / "ref" / "final.pt"), torch.load(tmp_path / "cut" / "final.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lr_schedules_against_their_formulas():
    total = 100
    assert [lr_at(s, 0.1, total, schedule="step") for s in (0, 49, 50, 74, 75, 99)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    for s in (0, 10, 50, 99):
        assert lr_at(s, 0.1, total, schedule="cosine") == pytest.approx(0.05 * (1 + math.cos(math.pi * s / total)))
    # Warm-up ramps linearly to the schedule, then cosine runs over the remaining steps.
    assert [lr_at(s, 0.1, total, schedule="cosine", warmup=10) for s in (0, 4, 9)] == pytest.approx([0.01, 0.05, 0.1])
    assert lr_at(55, 0.1, total, schedule="cosine", warmup=10) == pytest.approx(0.05 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_at(99, 0.1, total, schedule="constant") == 0.1
    with pytest.raises(ValueError, match="lr schedule must be one of"):
        lr_at(0, 0.1, 10, schedule="linear")


def test_validation_split_is_fixed_disjoint_and_evaluated(fake_cifar10, tmp_path):
    from kmeansinit.data import load_dataset
    from kmeansinit.train import split_validation

    ds = load_dataset("cifar10", fake_cifar10)
    a, b = split_validation(ds, 12), split_validation(ds, 12)
    assert torch.equal(a.val_x, b.val_x) and len(a.train_y) == len(ds.train_y) - 12
    flat = lambda x: {bytes(r.numpy()) for r in x.reshape(x.shape[0], -1)}  # noqa: E731
    assert not flat(a.val_x) & flat(a.train_x) and flat(a.val_x) | flat(a.train_x) == flat(ds.train_x)
    with pytest.raises(ValueError, match="val must be between 1 and 59"):
        split_validation(ds, 60)
    train(tiny(fake_cifar10, tmp_path / "run", val=12, test_every=5, iterations=12, batch_size=8), progress=False)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Validation every eval_every (6); the test set every test_every (5), which need not divide it,
    # and at the end.
    assert [r["step"] for r in rows if "test_acc" in r] == [5, 10, 12]
    assert {6, 12} <= {r["step"] for r in rows if "val_acc" in r}
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["val"] == 12 and cfg["resolved_iterations"] == 12


def test_zoo_model_trains_with_its_recipe(fake_cifar10, tmp_path, capsys):
    rc = main(["train", "--data", str(fake_cifar10), "--model", "resnet20", "--width", "0.25", "--batch-size", "8",
               "--iterations", "4", "--eval-every", "2", "--init", "kmeans", "--init-images", "16",
               "--init-option", "steps=1", "--out", str(tmp_path / "r"), "--threads", "1", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (cfg["model"], cfg["lr"], cfg["nesterov"], cfg["weight_decay"], cfg["crop"], cfg["lr_schedule"]) == \
        ("resnet20", 0.1, True, 5e-4, 4, "cosine")
    state = torch.load(tmp_path / "r" / "final.pt", weights_only=True)
    assert "layer3.2.conv2.weight" in state


def test_recipe_fills_only_what_the_user_did_not_give():
    from kmeansinit.cli import build_parser, train_config_from_args

    def cfg(*argv):
        return train_config_from_args(build_parser().parse_args(["train", *argv]))

    p = cfg()
    assert (p.model, p.lr, p.nesterov, p.weight_decay, p.crop, p.lr_schedule) == ("paper", 1e-3, False, 1e-5, 0, "paper")
    z = cfg("--model", "vgg11", "--weight-decay", "1e-4", "--no-nesterov", "--lr-schedule", "step")
    assert (z.lr, z.nesterov, z.weight_decay, z.crop, z.lr_schedule) == (0.1, False, 1e-4, 4, "step")
    a = cfg("--model", "resnet20", "--optimizer", "adam")
    assert (a.lr, a.nesterov) == (1e-3, False)


def test_init_cache_hit_does_not_run_the_init(fake_cifar10, tmp_path, monkeypatch):
    import kmeansinit.train as T

    calls = []
    real = T.initialize_
    monkeypatch.setattr(T, "initialize_", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(init="kmeans", init_options=dict(steps=1), init_cache=str(tmp_path / "cache"))
    train(tiny(fake_cifar10, tmp_path / "a", **kw), progress=False)
    assert calls == [1]
    # Same init key, another run (other optimizer): loaded, never computed; same weights.
    train(tiny(fake_cifar10, tmp_path / "b", optimizer="adam", **kw), progress=False)
    assert calls == [1]
    a, b = (torch.load(tmp_path / r / "init.pt", weights_only=True) for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Another seed is another key: computed.
    train(tiny(fake_cifar10, tmp_path / "c", seed=1, **kw), progress=False)
    assert calls == [1, 1]


def test_labels_train_on_a_balanced_subset_and_init_on_every_image(fake_cifar10, tmp_path):
    from kmeansinit.data import load_dataset
    from kmeansinit.train import labelled_subset

    ds = load_dataset("cifar10", fake_cifar10)
    sub = labelled_subset(split_validation(ds, 10), 20)
    assert torch.equal(sub.train_x, labelled_subset(split_validation(ds, 10), 20).train_x)  # fixed images
    counts = torch.bincount(sub.train_y, minlength=10)
    have = torch.bincount(split_validation(ds, 10).train_y, minlength=10)
    # As balanced as the classes allow: 2 of each class that has 2, the rest spread over the others.
    assert int(counts.sum()) == 20 and bool((counts <= have).all()) and int(counts.max() - counts[have >= 3].min()) <= 1
    assert sub.val_x.shape[0] == 10  # the validation split comes along
    with pytest.raises(ValueError, match="labels must be between 1 and 60"):
        labelled_subset(ds, 61)
    # The k-means init draws from every training image, so a 16-label run starts from the same
    # weights as a run on all labels; only training sees the subset (2 steps an epoch at batch 8).
    kw = dict(init="kmeans", init_images=32, init_options=dict(steps=2), epochs=1, batch_size=8)
    train(tiny(fake_cifar10, tmp_path / "all", **kw), progress=False)
    train(tiny(fake_cifar10, tmp_path / "few", labels=16, **kw), progress=False)
    a, b = torch.load(tmp_path / "all" / "init.pt"), torch.load(tmp_path / "few" / "init.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "few" / "config.json").read_text())
    assert cfg["labels"] == 16 and cfg["resolved_iterations"] == 2
    assert json.loads((tmp_path / "all" / "config.json").read_text())["resolved_iterations"] == 60 // 8


def test_no_batch_norm_and_labels_from_the_cli_and_grid_command(fake_cifar10, tmp_path):
    from kmeansinit.experiments import Cell, cell_command

    out = tmp_path / "nobn"
    rc = main(["train", "--data", str(fake_cifar10), "--out", str(out), "--width", "0.25", "--batch-size", "8",
               "--iterations", "4", "--eval-every", "2", "--log-every", "2", "--init", "kmeans-he-norm",
               "--init-images", "32", "--init-option", "steps=2", "--no-batch-norm", "--labels", "24", "--quiet"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["batch_norm"] is False and cfg["labels"] == 24
    state = torch.load(out / "final.pt")
    assert not any("running_mean" in k for k in state) and all(torch.isfinite(v).all() for v in state.values())
    # The grid's command line for such a cell spells both out.
    cell = Cell("c", TrainConfig(data=str(fake_cifar10), out=str(tmp_path / "c"), batch_norm=False, labels=24))
    cmd = cell_command(cell)
    assert "--no-batch-norm" in cmd and cmd[cmd.index("--labels") + 1] == "24"


def test_patch_norm_from_the_cli_its_init_cache_key_and_grid_command(fake_cifar10, tmp_path):
    from kmeansinit.data import load_dataset
    from kmeansinit.experiments import Cell, cell_command
    from kmeansinit.models.coates import PatchNormConv2d
    from kmeansinit.train import build_model, init_key

    out = tmp_path / "pn"
    rc = main(["train", "--data", str(fake_cifar10), "--out", str(out), "--model", "coates", "--width", "0.01",
               "--patch-norm", "--batch-size", "8", "--iterations", "2", "--eval-every", "2", "--log-every", "2",
               "--init", "lsuv", "--init-images", "16", "--init-cache", str(tmp_path / "cache"), "--quiet"])
    assert rc == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["patch_norm"] is True
    state = torch.load(out / "final.pt")
    assert all(torch.isfinite(v).all() for v in state.values())
    cfg = TrainConfig(data=str(fake_cifar10), model="coates", width=0.01, init="lsuv", patch_norm=True)
    assert isinstance(build_model(cfg, 10, 3).features[0], PatchNormConv2d)
    # LSUV's scales see the normalized patches: a net without patch_norm must not reuse the init.
    ds = load_dataset("cifar10", str(fake_cifar10))
    assert init_key(cfg, ds) != init_key(dataclasses.replace(cfg, patch_norm=False), ds)
    cmd = cell_command(Cell("c", dataclasses.replace(cfg, out=str(tmp_path / "c"))))
    assert "--patch-norm" in cmd
    with pytest.raises(ValueError, match="patch_norm is offered for model coates only"):
        TrainConfig(patch_norm=True).validate()


def test_triangle_net_trains_with_its_whitening_fitted_and_cached(fake_cifar10, tmp_path):
    """kmeansinit train fits coates-triangle's patch whitening on the init images before the init;
    the init cache carries it, so a second run that loads the init starts from the same net."""
    def run(name):
        out = tmp_path / name
        rc = main(["train", "--data", str(fake_cifar10), "--out", str(out), "--model", "coates-triangle", "--width",
                   "0.01", "--batch-size", "8", "--iterations", "2", "--eval-every", "2", "--log-every", "2", "--init",
                   "kmeans-layerwise", "--init-images", "16", "--init-cache", str(tmp_path / "cache"), "--quiet"])
        assert rc == 0
        return torch.load(out / "final.pt")

    first, second = run("a"), run("b")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert bool(first["features.0.fitted"]) and first["features.0.weight"].abs().sum() > 0
    for k, v in first.items():
        torch.testing.assert_close(second[k], v, rtol=0, atol=0, msg=k)


def test_he_variance_norm_run_has_the_kmeans_variance_runs_norms(fake_cifar10, tmp_path):
    # train passes the run's seed to the control's kmeans-variance copy: the same norms as the
    # kmeans-variance run of that seed (on the same init images), in every conv it clusters.
    kw = dict(init_options=dict(steps=1), iterations=1, seed=2)
    train(tiny(fake_cifar10, tmp_path / "kv", init="kmeans-variance", **kw), progress=False)
    train(tiny(fake_cifar10, tmp_path / "ctrl", init="he-variance-norm", **kw), progress=False)
    a, b = (torch.load(tmp_path / r / "init.pt", weights_only=True) for r in ("kv", "ctrl"))
    convs = [k for k, v in a.items() if k.endswith("weight") and v.dim() == 4]
    assert convs
    for k in convs:
        torch.testing.assert_close(b[k].flatten(1).norm(dim=1), a[k].flatten(1).norm(dim=1))
        assert not torch.allclose(b[k], a[k])  # other directions
    assert json.loads((tmp_path / "ctrl" / "init_report.json").read_text())["method"] == "he-variance-norm"


def test_cpu_bf16_flags_are_read_from_cpuinfo(tmp_path):
    from kmeansinit.train import cpu_has_native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse avx2 fma\n")
    assert cpu_has_native_bf16(str(info)) is False
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx2\n")
    assert cpu_has_native_bf16(str(info)) is True
    info.write_text("flags\t\t: fpu amx_tile amx_bf16\n")
    assert cpu_has_native_bf16(str(info)) is True
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is None


def test_bf16_on_a_cpu_without_bf16_units_warns_once(fake_cifar10, tmp_path, capsys, monkeypatch):
    import kmeansinit.train as t

    monkeypatch.setattr(t, "cpu_has_native_bf16", lambda: False)
    train(tiny(fake_cifar10, tmp_path / "a", precision="bf16", iterations=2), progress=False)
    assert capsys.readouterr().out.count("--precision bf16 on a CPU without bf16 units") == 1
    # Stacked training starts runs too: one warning for the stack.
    from kmeansinit.train_stacked import train_stacked

    train_stacked([tiny(fake_cifar10, tmp_path / f"s{i}", precision="bf16", iterations=2, seed=i) for i in range(2)],
                  progress=False)
    assert capsys.readouterr().out.count("--precision bf16 on a CPU without bf16 units") == 1
    monkeypatch.setattr(t, "cpu_has_native_bf16", lambda: True)
    train(tiny(fake_cifar10, tmp_path / "b", precision="bf16", iterations=2), progress=False)
    assert "without bf16 units" not in capsys.readouterr().out
