import json
import logging
import sys
import types

import numpy as np
import pytest
import torch

from megatron_gad import metrics
from megatron_gad.metrics import MetricsLogger, Timer, format_console_line, reduce_metrics


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(metrics, "_now", fake)
    return fake


def test_timer_accumulates_sections_and_step(clock):
    timer = Timer()
    with timer("gen"):
        clock.t += 2.0
    clock.t += 0.5  # untimed work still counts for the step
    with timer("gen"):
        clock.t += 1.0
    with timer("update"):
        clock.t += 0.25
    assert timer.collect() == {"timing_s/gen": 3.0, "timing_s/update": 0.25, "timing_s/step": 3.75}
    # collect starts a new step
    with timer("gen"):
        clock.t += 1.0
    assert timer.collect() == {"timing_s/gen": 1.0, "timing_s/step": 1.0}


def test_timer_counts_sections_that_raise(clock):
    timer = Timer()
    with pytest.raises(RuntimeError):
        with timer("gen"):
            clock.t += 4.0
            raise RuntimeError
    timer_out = timer.collect()
    assert timer_out == {"timing_s/gen": 4.0, "timing_s/step": 4.0}


def test_reduce_metrics():
    out = reduce_metrics([
        {"a": 1.0, "b": torch.tensor(2.0), "c": np.float32(0.5)},
        {"a": 3, "b": torch.tensor([4.0])},
    ])
    assert out == {"a": 2.0, "b": 3.0, "c": 0.5}
    assert reduce_metrics([]) == {}
    with pytest.raises(TypeError, match="expected a scalar tensor"):
        reduce_metrics([{"a": torch.ones(2)}])
    with pytest.raises(TypeError, match="expected a number, got str"):
        reduce_metrics([{"a": "x"}])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_jsonl_content_exact(tmp_path, capsys):
    with MetricsLogger(tmp_path, loggers=("jsonl",), total_steps=3) as logger:
        logger.log(1, {"critic/d_loss": torch.tensor(0.5), "stage": "warmup"})
        logger.log(2, {"critic/d_loss": 0.25, "bad": float("nan")})
        # Flushed per line: readable before close.
        assert (tmp_path / "metrics.jsonl").read_text() == (
            '{"step": 1, "critic/d_loss": 0.5, "stage": "warmup"}\n'
            '{"step": 2, "critic/d_loss": 0.25, "bad": "nan"}\n'
        )
    assert capsys.readouterr().out == ""  # no console logger requested


def test_resume_truncates_later_steps(tmp_path):
    with MetricsLogger(tmp_path, loggers=("jsonl",)) as logger:
        for step in range(1, 6):
            logger.log(step, {"x": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "x":')  # a line cut short by a crash
    with MetricsLogger(tmp_path, loggers=("jsonl",), resume_step=3) as logger:
        logger.log(4, {"x": 40.0})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}, {"step": 3, "x": 3.0}, {"step": 4, "x": 40.0},
    ]
    # A fresh run (no resume_step) starts a new file.
    with MetricsLogger(tmp_path, loggers=("jsonl",)) as logger:
        logger.log(1, {"x": 7.0})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "x": 7.0}]


def test_console_line(tmp_path, capsys):
    with MetricsLogger(tmp_path, loggers=("console",), total_steps=10) as logger:
        logger.log(3, {
            "stage": "gad", "critic/d_loss": 0.69314, "critic/d_acc": 0.5, "actor/pg_loss": -0.01234,
            "response_length/mean": 12.25, "timing_s/step": 0.271, "other": 1.0,
        })
        logger.log(4, {"critic/d_loss": 0.6})
    assert capsys.readouterr().out == (
        "step 3/10 | stage gad | d_loss 0.6931 | d_acc 0.500 | pg_loss -0.0123 | resp_len 12.2 | s/step 0.27\n"
        "step 4/10 | d_loss 0.6000\n"
    )
    assert not (tmp_path / "metrics.jsonl").exists()
    assert format_console_line(5, {}) == "step 5"


def test_console_with_tty_uses_progress_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    logger = MetricsLogger(tmp_path, loggers=("console",), total_steps=4)
    logger.log(1, {"critic/d_acc": 0.75})
    assert logger._bar is not None and logger._bar.n == 1
    logger.close()
    out = capsys.readouterr().out
    assert "step 1/4 | d_acc 0.750\n" in out and "1/4" in out.replace("step 1/4", "")


def test_wandb_missing_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes "import wandb" raise ImportError
    with pytest.raises(ImportError, match=r"logger 'wandb' was requested but wandb is not installed"):
        MetricsLogger(tmp_path, loggers=("wandb",))


class _FakeWandb(types.SimpleNamespace):
    """A stand-in ``wandb`` module: ``init`` records its calls; an online init raises ``online_error``."""

    def __init__(self, online_error=None):
        calls = []

        class Run:
            def log(self, data, step):
                calls.append(("log", data, step))

            def finish(self):
                calls.append(("finish",))

        class Settings:
            def __init__(self, **kw):
                self.kw = kw

            def __eq__(self, other):
                return isinstance(other, Settings) and other.kw == self.kw

        def init(**kwargs):
            calls.append(("init", kwargs))
            if kwargs["mode"] == "online" and online_error is not None:
                raise online_error
            return Run()

        super().__init__(init=init, Settings=Settings, calls=calls)


def test_wandb_online_by_default(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    logger = MetricsLogger(tmp_path, loggers=("wandb",), project="p", experiment="e", config_dict={"lr": 1.0})
    logger.log(2, {"critic/d_acc": torch.tensor(0.5), "stage": "gad"})
    logger.close()
    assert fake.calls == [
        ("init", {"project": "p", "name": "e", "config": {"lr": 1.0}, "dir": str(tmp_path), "mode": "online",
                  "settings": fake.Settings(init_timeout=30.0)}),
        ("log", {"critic/d_acc": 0.5}, 2),
        ("finish",),
    ]
    # a mode the person chose is used as is, with no fallback
    for mode in ("offline", "online"):
        monkeypatch.setenv("WANDB_MODE", mode)
        fake.calls.clear()
        MetricsLogger(tmp_path, loggers=("wandb",)).close()
        assert [c[1]["mode"] for c in fake.calls if c[0] == "init"] == [mode]


def test_wandb_unreachable_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    class CommError(Exception):
        pass

    fake = _FakeWandb(CommError("Run initialization has timed out after 30.0 sec.\nPlease try again."))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")  # wandb reads it itself: no settings passed
    with caplog.at_level(logging.WARNING, logger="megatron_gad"):
        logger = MetricsLogger(tmp_path, loggers=("jsonl", "wandb"), project="p", experiment="e")
    logger.log(1, {"critic/d_acc": 0.25})
    logger.close()
    kw = {"project": "p", "name": "e", "config": {}, "dir": str(tmp_path)}
    assert fake.calls == [("init", dict(kw, mode="online")), ("init", dict(kw, mode="offline")),
                          ("log", {"critic/d_acc": 0.25}, 1), ("finish",)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"wandb: cannot log online (CommError: Run initialization has timed out after 30.0 sec. Please try again.); "
        f"logging offline to {tmp_path}/wandb instead, the run goes on (upload later with `wandb sync "
        f"{tmp_path}/wandb/offline-run-*`; set WANDB_MODE=offline to skip the online attempt)"]
    # the jsonl record is written as always
    assert json.loads(open(tmp_path / "metrics.jsonl").read()) == {"step": 1, "critic/d_acc": 0.25}


def test_unknown_logger(tmp_path):
    with pytest.raises(ValueError, match="unknown loggers"):
        MetricsLogger(tmp_path, loggers=("tensorboard",))
