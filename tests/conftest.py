"""Shared fixtures and helpers of the tests: a tiny Fashion-MNIST, a model pretrained on it, a
reference CBP run, the helpers of the end-to-end tests, and the small models and files that more
than one test file builds (one copy each)."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import cbp
from cbp.cli import commands as cli
from cbp.core.lagrangian import Lagrangian
from cbp.files.checkpoint import load_checkpoint
from cbp.training.runs import CHECKPOINT_NAME, LOG_NAME, read_jsonl
from cbp.zoo.data import FASHION_MNIST_DIR, read_idx
from cbp.zoo.gpt import GPT, GPTConfig

TINY_TRAIN, TINY_VAL = 256, 128


@contextlib.contextmanager
def one_thread():
    """Train on one thread: on a machine whose cores are busy, two threads wait on each other
    (a ResNet-20 step measured 0.25 s on one, 0.8-3 s on two). Subprocesses get the same through
    ``OMP_NUM_THREADS=1``, so their numbers match in-process ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def quiet_cli(monkeypatch):
    """CLI runs on one thread and without plots: neither changes what the CLI tests check."""
    import cbp.cli.training
    monkeypatch.setattr(cbp.cli.training, "plot_run", lambda run_dir: [])
    with one_thread():
        yield


def fails(capsys, argv: list[str], *needles: str) -> str:
    """``cbp argv`` exits 2 with exactly one line, ``cbp: error: ...``, holding ``needles``."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("cbp: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def signals_raise():
    """Should a signal reach past the training loop, fail the test instead of killing pytest."""
    def fail(signum, frame):
        raise RuntimeError(f"{signal.Signals(signum).name} was not handled by the training loop")
    previous = {s: signal.signal(s, fail) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def write_idx(path: str, array: np.ndarray) -> None:
    """An uncompressed IDX file of unsigned bytes (type 0x08), as LeCun's format describes it."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]))
        for size in array.shape:
            f.write(int(size).to_bytes(4, "big"))
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture(scope="session")
def tiny_fashion(tmp_path_factory) -> str:
    """The first 256 training and 128 test images of Debian's Fashion-MNIST, as IDX files.

    Reading these instead of the full 60k-image archive keeps every CLI call fast.
    """
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip("dataset-fashion-mnist is not installed")
    folder = tmp_path_factory.mktemp("fashion")
    for stem, count in (("train", TINY_TRAIN), ("t10k", TINY_VAL)):
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            data = read_idx(os.path.join(FASHION_MNIST_DIR, f"{stem}-{kind}.gz"))[:count]
            write_idx(str(folder / f"{stem}-{kind}"), data.numpy())
    return str(folder)


@pytest.fixture(scope="session")
def pretrained(tiny_fashion, tmp_path_factory) -> str:
    """A ResNet-20 checkpoint after one pretraining epoch on the tiny set."""
    out = tmp_path_factory.mktemp("pretrain")
    with one_thread():
        assert cli.main(["pretrain", "--data-dir", tiny_fashion, "--epochs", "1",
                         "--batch-size", "32", "--out", str(out), "--quiet"]) == 0
    return str(out / CHECKPOINT_NAME)


@pytest.fixture(scope="session")
def quantize_argv(tiny_fashion, pretrained):
    """``cbp quantize`` argv for a small CBP run: 96 images = 3 steps of 32 per epoch.

    A large eta_lambda and p_max 1 make g and lambda change at every epoch, so a resume that got
    any of the CBP state wrong would show in the weights.
    """
    def argv(out: str, epochs: int, *extra: str) -> list[str]:
        return ["quantize", "--from", pretrained, "--data-dir", tiny_fashion, "--limit", "96",
                "--val-limit", "64", "--batch-size", "32", "--multiplier-lr", "1e-2", "--p-max",
                "1", "--epochs", str(epochs), "--out", out, "--quiet",
                # bit-identical resume is checked on the CPU, also on a machine with a GPU (where
                # the default device is CUDA, whose convolutions are not deterministic)
                "--device", "cpu", *extra]
    return argv


REFERENCE_EPOCHS = 2


@pytest.fixture(scope="session")
def reference_run(quantize_argv, tmp_path_factory) -> str:
    """The run directory of an uninterrupted ``REFERENCE_EPOCHS``-epoch CBP run."""
    out = str(tmp_path_factory.mktemp("reference"))
    with one_thread():
        assert cli.main(quantize_argv(out, REFERENCE_EPOCHS)) == 0
    return out


def _assert_same(a, b, where: str = "state") -> None:
    """Bit-identical nested checkpoint contents (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="session")
def assert_same_run():
    """Compare two run directories: checkpoints bit for bit, log rows except their timings."""
    def check(dir_a: str, dir_b: str) -> None:
        a, b = (load_checkpoint(os.path.join(d, CHECKPOINT_NAME)) for d in (dir_a, dir_b))
        for key in ("epoch", "step", "model", "optimizer", "cbp", "scheduler", "oscillation",
                    "rng"):
            _assert_same(a[key], b[key], key)
        rows_a, rows_b = (read_jsonl(os.path.join(d, LOG_NAME)) for d in (dir_a, dir_b))
        for row in (*rows_a, *rows_b):
            del row["seconds"]
        assert rows_a == rows_b
    return check


# ---- helpers of the end-to-end tests --------------------------------------------------------------

STEPS = 3  # per epoch in the quantize_argv runs: 96 images in batches of 32


def after_step(monkeypatch, call: int, action) -> None:
    """Run ``action(lagrangian)`` right after the ``call``-th CBP step (counting from 1)."""
    step, count = Lagrangian.step, [0]

    def counted(self, *args):
        step(self, *args)
        count[0] += 1
        if count[0] == call:
            action(self)
    monkeypatch.setattr(Lagrangian, "step", counted)


def spawn(code: str, *args: str) -> subprocess.Popen:
    """``python -c code args`` on one thread, its pipes open; killed if it hangs for 2 minutes.

    Under ``make mutation``'s first pass (``MUTANT_UNDER_TEST=stats``) the child runs without
    mutmut's switch: its frame walk cannot resolve a ``-c`` program, and no child's call is
    attributed to a test anyway. Mutant runs keep the switch, so children run the mutant.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if env.get("MUTANT_UNDER_TEST") == "stats":
        del env["MUTANT_UNDER_TEST"]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(120, proc.kill)   # a hung child fails the test, not the session
    watchdog.daemon = True
    watchdog.start()
    return proc


class Payload:
    """Unpickling this runs ``exec``: it creates the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def first_scale(state: dict) -> str:
    """The key of the first layer scale in a checkpoint's model."""
    return next(k for k in state["model"] if k.endswith(".cbp_scale"))


def image_folders(root, train: list[str], val: list[str]) -> str:
    """An image folder data set: ``train/`` and ``val/`` with the given classes, two random
    16 px RGB PNGs each."""
    rng = np.random.default_rng(0)
    for split, classes in (("train", train), ("val", val)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return str(root)


# -- the toy model of test_oscillation.py and test_peers.py ----------------------------------------

def toy(levels="ternary"):
    """Linear-Linear-Linear; the middle one (4 weights, scale a = 0.1) is quantized."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.1, -0.1], [0.1, 0.1]]))
    return cbp.prepare(model, cbp.CBPConfig(levels))


def put(model, factors):
    """Set the quantized weights to ``factors * a`` (flattened order)."""
    layer = model[1]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(factors).view(2, 2) * layer.cbp_scale)


# -- the small convolutional net of test_export.py, test_summary.py and test_onnx_export.py --------

def small_net() -> nn.Module:
    """Four convs and a Linear; prepare quantizes the three in the middle (one with a bias)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def prepared_net(levels="binary") -> nn.Module:
    model = small_net()
    model(torch.randn(16, 3, 8, 8))  # non-trivial BatchNorm running stats
    return cbp.prepare(model, cbp.CBPConfig(levels=levels)).eval()


# -- the tiny GPT and generated plays of test_gpt, test_text, test_tasks, test_cli_robustness ------

TINY = GPTConfig(vocab_size=11, context=16, layers=2, heads=2, width=16)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY)


def pretrain_tiny_gpt(root, chars: int, epochs: int, val_limit: int) -> tuple[str, list[str]]:
    """A GPT pretrained through the CLI into ``root/fp`` for ``epochs`` epochs of 2 steps on
    ``chars`` generated characters; returns the texts' folder and the flags the runs share."""
    texts = write_texts(os.path.join(root, "texts"), chars=chars)
    common = ["--data", "shakespeare", "--data-dir", texts, "--batch-size", "4", "--epochs",
              str(epochs), "--epoch-iters", "2", "--val-limit", str(val_limit), "--optimizer",
              "adamw", "--quiet"]
    with one_thread():
        assert cli.main(["pretrain", "--model", "gpt", "--out", os.path.join(root, "fp"),
                         *common]) == 0
    return texts, common


def write_texts(folder, seed: int = 0, chars: int = 6000) -> str:
    """Two generated plays (``*_gut.txt``) and a file the reader must ignore."""
    rng = random.Random(seed)
    words = ["thou", "art", "the", "king", "ROMEO:", "JULIET:", "love", "night", "O", "sweet"]
    os.makedirs(folder, exist_ok=True)
    for name in ("b_play_gut.txt", "a_play_gut.txt"):
        text = " ".join(rng.choice(words) + ("\n" if rng.random() < 0.1 else "")
                        for _ in range(chars // 5))
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    with open(os.path.join(folder, "notes_gut_f.txt"), "w") as f:
        f.write("~~ not part of the corpus ~~")
    return str(folder)


class FullDisk:
    """A file on a full disk: the first write fails with ENOSPC, later ones with ``later``."""

    def __init__(self, file, later: int = errno.ENOSPC) -> None:
        self._file, self._code, self._later = file, errno.ENOSPC, later

    def write(self, data):
        code, self._code = self._code, self._later
        raise OSError(code, os.strerror(code))

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)


def set_field(state: dict, field: str, value, maxsplit: int = -1) -> None:
    """Set the dotted ``field`` of nested dicts to ``value``; the value ``KeyError`` removes it.
    ``maxsplit`` as in ``str.split``: 1 keeps a tensor's whole name after ``model.``."""
    *parents, last = field.split(".", maxsplit)
    for part in parents:
        state = state[part]
    if value is KeyError:
        del state[last]
    else:
        state[last] = value
