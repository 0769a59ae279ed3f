"""The character-level GPT, transformer layer selection, tied weights, text data and the LM CLI.

Text comes from files generated here, never from the Shakespeare download.
"""

import math
import os
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import one_thread

import cbp
from cbp.cli import commands as cli
from cbp.files.checkpoint import load_checkpoint
from cbp.training import runs
from cbp.training.train import CHECKPOINT_NAME, LOG_NAME, read_jsonl
from cbp.zoo.gpt import CBP_SELECTION, GPT, GPTConfig, KVCache, generate
from cbp.zoo.tasks import LanguageModel
from cbp.zoo.text import CharVocab, CharWindows, load_text, read_corpus, split_text

TINY = GPTConfig(vocab_size=11, context=16, layers=2, heads=2, width=16)
BLOCK_LINEARS = [f"blocks.{i}.{m}" for i in range(2)
                 for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY)


# ---- the model -----------------------------------------------------------------------------------

def test_gpt_forward_backward_shapes_causality_and_tied_head():
    model = tiny_gpt()
    x = torch.randint(0, 11, (3, 16))
    logits = model(x)
    assert logits.shape == (3, 16, 11)
    loss = LanguageModel.loss(logits, x)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.reshape(-1, 11), x.reshape(-1)).item())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0, name
    assert model.lm_head.weight is model.wte.weight
    # causal: changing the last token leaves every earlier position's logits unchanged
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 11
    with torch.no_grad():
        torch.testing.assert_close(model(y)[:, :-1], model(x)[:, :-1])
        assert not torch.allclose(model(y)[:, -1], model(x)[:, -1])
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_a_few_adam_steps_learn_a_repeating_sequence():
    model = tiny_gpt()
    x = torch.arange(17).remainder(11)[None].repeat(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = LanguageModel.loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(11) - 0.3 and losses[-1] < 0.1


# ---- layer selection for transformers ----------------------------------------------------------

def test_gpt_selection_quantizes_the_block_linears_only():
    model = tiny_gpt()
    assert cbp.select_layers(model, cbp.CBPConfig(**CBP_SELECTION)) == BLOCK_LINEARS
    # the CNN rule would keep the first attention projection float and quantize the tied head
    cnn_rule = cbp.select_layers(model, cbp.CBPConfig())
    assert "blocks.0.attn.qkv" not in cnn_rule and "lm_head" not in cnn_rule
    cbp.prepare(model, cbp.CBPConfig("ternary", **CBP_SELECTION))
    assert list(cbp.quantized_layers(model)) == BLOCK_LINEARS
    assert type(model.lm_head) is nn.Linear and type(model.wte) is nn.Embedding


class _Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False)
                                                              for _ in range(4))


class _MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d)
        self.down_proj = nn.Linear(2 * d, d)


class _DecoderLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.input_layernorm, self.self_attn = nn.LayerNorm(d), _Attention(d)
        self.post_attention_layernorm, self.mlp = nn.LayerNorm(d), _MLP(d)


class _HFStyleLM(nn.Module):
    """The module tree of a Hugging Face Llama-style causal LM (names only; no forward needed)."""

    def __init__(self, vocab=13, d=8, layers=2):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(_DecoderLayer(d) for _ in range(layers))
        self.model.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight


HF_LINEARS = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.mark.parametrize("recipe", [
    {"skip_first_last": False, "include": [r"\.layers\.\d+\."]},
    {"skip_first_last": False, "include": [r"\.layers?\.\d+\."]},   # the README's, BERT's too
    {"skip_first_last": False, "exclude": [r"^lm_head$"]},
    {"skip_first_last": False, "filter_fn": lambda module, name: ".layers." in name},
])
def test_transformer_recipes_select_every_decoder_linear_on_a_hf_style_tree(recipe):
    model = _HFStyleLM()
    assert cbp.select_layers(model, cbp.CBPConfig(**recipe)) == HF_LINEARS
    cbp.prepare(model, cbp.CBPConfig("binary", **recipe))
    assert sorted(cbp.quantized_layers(model)) == sorted(HF_LINEARS)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, still float


# ---- tied weights: one multiplier per parameter (issue 16, item 7) --------------------------------

def _tied_pair() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False))
    model[2].weight = model[0].weight
    return model


def test_a_tied_weight_gets_one_multiplier_and_its_penalty_gradient_once():
    model = cbp.prepare(_tied_pair(), cbp.CBPConfig("binary", skip_first_last=False,
                                                    initial_multiplier_update=False))
    assert len(cbp.quantized_layers(model)) == 2          # both layers quantize the shared weight
    optimizer = torch.optim.SGD(cbp.param_groups(model, 1e-4), lr=0.1)  # no duplicate-group error
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 1
    lagrangian = cbp.Lagrangian(model, cbp.CBPConfig("binary", skip_first_last=False,
                                                     initial_multiplier_update=False), optimizer)
    assert list(lagrangian.multipliers) == ["0"]
    w = model[0].weight
    with torch.no_grad():
        w.copy_(torch.tensor([[0.3, -0.3, 1.5, -1.5]] * 4))   # a = mean|w| = 0.9: levels -0.9, 0.9
        model[0].cbp_scale.fill_(0.9)
    lagrangian.multipliers["0"].fill_(0.5)
    lagrangian.g = math.inf  # no window: slope of Y is -2 below a level, +2 above it
    w.grad = torch.zeros_like(w)
    value = lagrangian.add_penalty_grad()
    # Y = 2|w - Q(w)|: 1.2 for +-0.3, 1.2 for +-1.5; slope sign(w - Q(w)) * 2
    expected_grad = 0.5 * 2 * torch.tensor([[-1.0, 1.0, 1.0, -1.0]] * 4)
    torch.testing.assert_close(w.grad, expected_grad)       # once, not twice
    assert float(value) == pytest.approx(0.5 * 1.2 * 16)
    assert float(lagrangian.penalty().detach()) == pytest.approx(0.5 * 1.2 * 16)
    assert cbp.cfs(model) == pytest.approx(1.2)
    assert [s["layer"] for s in cbp.layer_stats(model)] == ["0"]


def test_gpt_tied_head_and_embedding_share_one_optimizer_slot():
    model = tiny_gpt()
    groups = cbp.param_groups(model, 0.1)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len(list(model.parameters()))   # parameters() lists a tied one once
    assert any(p is model.wte.weight for p in groups[1]["params"])  # the embedding's: no decay


# ---- text data -----------------------------------------------------------------------------------

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


def test_text_reader_split_vocabulary_and_windows(tmp_path):
    folder = write_texts(tmp_path)
    a, b = (open(os.path.join(folder, n)).read() for n in ("a_play_gut.txt", "b_play_gut.txt"))
    text = read_corpus(folder)
    assert text == a + "\n" + b and "~" not in text
    train, val = split_text(text)
    assert train + val == text and len(val) == int(len(text) * 0.1)
    vocab = CharVocab.of(text)
    assert vocab.chars == "".join(sorted(set(text)))
    assert vocab.decode(vocab.encode("ROMEO: love")) == "ROMEO: love"
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        vocab.encode("~")
    windows = load_text(folder, train=False, context=32)
    assert len(windows) == (len(val) - 1) // 32
    x, y = windows[2]
    assert vocab.decode(x) == val[64:96] and vocab.decode(y) == val[65:97]
    assert len(load_text(folder, train=True, context=32, limit=5)) == 5
    with pytest.raises(IndexError):
        windows[len(windows)]


def test_text_reader_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="no \\*_gut.txt text files"):
        read_corpus(str(tmp_path))
    (tmp_path / "x_gut.txt").write_text("short")
    with pytest.raises(ValueError, match="fewer than one window"):
        load_text(str(tmp_path), train=True, context=128)


def test_language_model_evaluation_is_the_mean_token_loss_and_bits_per_char():
    model = tiny_gpt()
    tokens = torch.randint(0, 11, (16 * 5 + 1,))
    data = CharWindows(tokens, 16, CharVocab("abcdefghijk"))
    result = LanguageModel.evaluate(model, data, cbp.core.distributed.setup("cpu"), batch_size=2)
    with torch.no_grad():
        x, y = tokens[:-1].view(5, 16), tokens[1:].view(5, 16)
        expected = F.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1)).item()
    assert result["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert result["bpc"] == pytest.approx(expected / math.log(2), rel=1e-5)


# ---- export ------------------------------------------------------------------------------------

def test_export_and_load_packed_of_a_ternary_gpt_give_identical_logits(tmp_path):
    model = cbp.prepare(tiny_gpt(), cbp.CBPConfig("ternary", **CBP_SELECTION)).eval()
    path = cbp.export(model, tmp_path / "gpt.safetensors")
    loaded = cbp.load_packed(path, lambda: GPT(TINY))
    x = torch.randint(0, 11, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.lm_head.weight is loaded.wte.weight


# ---- CLI -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    """A GPT pretrained and quantized (ternary) for a few steps on generated text, via the CLI."""
    root = tmp_path_factory.mktemp("lm")
    texts = write_texts(root / "texts", chars=40000)
    common = ["--data", "shakespeare", "--data-dir", texts, "--batch-size", "4", "--epochs", "2",
              "--epoch-iters", "2", "--val-limit", "4", "--optimizer", "adamw", "--quiet"]
    with one_thread():
        assert cli.main(["pretrain", "--model", "gpt", "--out", str(root / "fp"), *common]) == 0
        assert cli.main(["quantize", "--from", str(root / "fp" / CHECKPOINT_NAME), "--constraint",
                         "ternary", "--out", str(root / "ter"), *common]) == 0
    return root, texts


def test_cli_pretrain_quantize_evaluate_language_model(lm_runs, capsys):
    root, texts = lm_runs
    rows = read_jsonl(str(root / "ter" / LOG_NAME))
    assert len(rows) == 2 and {"val_loss", "bpc", "cfs", "g"} <= set(rows[-1])
    assert rows[-1]["bpc"] == pytest.approx(rows[-1]["val_loss"] / math.log(2))
    meta = load_checkpoint(str(root / "ter" / CHECKPOINT_NAME))["meta"]
    assert meta["task"] == "language-model" and meta["include"] == list(CBP_SELECTION["include"])
    assert meta["skip_first_last"] is False and meta["vocab"] == CharVocab.of(read_corpus(texts)).chars
    model, _ = runs.load_model(str(root / "ter" / CHECKPOINT_NAME))
    assert len(cbp.quantized_layers(model)) == 16  # 4 layers x (qkv, proj, fc, proj)
    capsys.readouterr()
    with one_thread():
        assert cli.main(["evaluate", str(root / "ter" / CHECKPOINT_NAME), "--data-dir", texts,
                         "--val-limit", "4"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.strip().splitlines())
    assert float(printed["bpc"]) == pytest.approx(float(printed["val_loss"]) / math.log(2), rel=1e-4)
    assert float(printed["val_loss"]) == pytest.approx(rows[-1]["val_loss"], rel=1e-4)
    assert os.path.exists(root / "ter" / "curves.png")


def test_cli_quantize_first_last_exports_and_samples_the_trained_model(lm_runs, tmp_path, capsys):
    """`--quantize-first-last` quantizes the head tied to the float embedding: the export holds
    both (the head on its levels, the embedding as trained) and computes what the checkpoint's
    model computes; generate samples what that model samples (issue 26's tied-weight case)."""
    root, texts = lm_runs
    out, file = tmp_path / "fl", tmp_path / "fl.safetensors"
    with one_thread():
        assert cli.main(["quantize", "--from", str(root / "fp" / CHECKPOINT_NAME), "--constraint",
                         "ternary", "--quantize-first-last", "--out", str(out), "--data", "shakespeare",
                         "--data-dir", texts, "--batch-size", "4", "--epochs", "1", "--epoch-iters",
                         "2", "--val-limit", "4", "--optimizer", "adamw", "--quiet"]) == 0
        assert cli.main(["export", str(out / CHECKPOINT_NAME), str(file)]) == 0
    model, meta = runs.load_model(str(out / CHECKPOINT_NAME))
    assert "lm_head" in cbp.quantized_layers(model) and model.lm_head.weight is model.wte.weight
    loaded = cbp.load_packed(file, lambda: runs.rebuild_model(meta))
    assert loaded.lm_head.weight is not loaded.wte.weight
    x = torch.randint(0, meta["num_classes"], (2, 32))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    capsys.readouterr()
    assert cli.main(["generate", str(out / CHECKPOINT_NAME), "--prompt", "ROMEO:", "--tokens", "20"]) == 0
    prompt = CharVocab(meta["vocab"]).encode("ROMEO:")[None]
    expected = CharVocab(meta["vocab"]).decode(_generate_without_cache(model, prompt, 20, 0)[0])
    assert capsys.readouterr().out == expected + "\n"


def test_cli_generate_is_deterministic_for_a_seed(lm_runs, capsys):
    root, _ = lm_runs
    ckpt = str(root / "ter" / CHECKPOINT_NAME)
    outputs = []
    for seed in (0, 0, 1):
        capsys.readouterr()
        assert cli.main(["generate", ckpt, "--prompt", "ROMEO:", "--tokens", "40",
                         "--seed", str(seed)]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]
    assert outputs[0].startswith("ROMEO:") and len(outputs[0].rstrip("\n")) == 46


def _generate_without_cache(model, idx, tokens, seed, temperature=1.0, top_k=None):
    """The sampling loop by hand: the whole last-``context`` window through the model every step."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(tokens):
            logits = model(idx[:, -model.cfg.context:])[:, -1] / temperature
            if top_k is not None:
                logits[logits < logits.topk(top_k).values[:, -1:]] = -float("inf")
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)
            idx = torch.cat([idx, nxt], dim=1)
    return idx


def test_generate_matches_sampling_by_hand():
    model = tiny_gpt().eval()
    idx = torch.tensor([[1, 2]])
    assert torch.equal(generate(model, idx, 3, seed=5), _generate_without_cache(model, idx, 3, 5))


@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_k": 4}])
@pytest.mark.parametrize("prepared", [False, True])
def test_the_kv_cache_samples_what_the_whole_window_samples_also_past_the_context(options, prepared):
    """40 tokens after a 3-token prompt with a 16-token context: 13 steps on the cache, then 27 on
    a sliding window (every step re-run); token for token what the cache-free loop draws."""
    model = tiny_gpt(seed=3).eval()
    if prepared:
        cbp.prepare(model, cbp.CBPConfig("ternary", **CBP_SELECTION))
    idx = torch.tensor([[4, 1, 7]])
    for seed in (0, 1):
        out = generate(model, idx, 40, seed=seed, **options)
        assert out.shape == (1, 43) and torch.equal(out[:, :3], idx)
        assert torch.equal(out, _generate_without_cache(model, idx, 40, seed, **options))


def test_a_cached_forward_gives_the_logits_of_the_whole_sequence():
    model = tiny_gpt().eval()
    x = torch.randint(0, 11, (2, 16))
    cache = KVCache(TINY.layers)
    with torch.no_grad():
        steps = [model(x[:, :5], cache)] + [model(x[:, i : i + 1], cache) for i in range(5, 16)]
        torch.testing.assert_close(torch.cat(steps, dim=1), model(x))
        assert cache.length == 16 and cache.layers[1][0].shape == (2, 2, 16, 8)
        with pytest.raises(ValueError, match="17 tokens is longer than the context 16"):
            model(x[:, :1], cache)
        short = KVCache(TINY.layers)
        model(x[:, :3], short)
        with pytest.raises(ValueError, match="one token at a time"):
            model(x[:, 3:5], short)


def test_cli_language_model_mistakes_are_one_line(lm_runs, tiny_fashion, tmp_path, capsys):
    root, texts = lm_runs
    assert cli.main(["generate", str(root / "ter" / CHECKPOINT_NAME), "--prompt", "~"]) == 2
    assert "not in the model's vocabulary" in capsys.readouterr().err
    assert cli.main(["pretrain", "--model", "gpt", "--data", "fashion-mnist", "--data-dir",
                     tiny_fashion, "--out", str(tmp_path / "x")]) == 2
    assert "language models (gpt) take text" in capsys.readouterr().err
    assert cli.main(["pretrain", "--model", "resnet20", "--data", "shakespeare", "--data-dir",
                     texts, "--out", str(tmp_path / "y")]) == 2
    assert "does not fit dataset shakespeare" in capsys.readouterr().err


@pytest.fixture(scope="module")
def compare_gpt():
    """benchmarks/compare_gpt.py as a module, and a size of a few steps for the generated text."""
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "compare_gpt.py")
    spec = importlib.util.spec_from_file_location("bench_compare_gpt", path)
    bench = sys.modules["bench_compare_gpt"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench, bench.Size(train_windows=64, val_windows=2, test_windows=4, batch=4,
                             epoch_iters=1, lr=1e-3, multiplier_lr=1e-1, p_max=1,
                             stop_once_g_exceeds=3, seeds=1, tune_windows=2)


def test_compare_gpt_cells_table_and_samples(compare_gpt, lm_runs, tmp_path):
    """benchmarks/compare_gpt.py's cells on the generated text: values in range, CBP on its levels."""
    (bench, size), (root, texts) = compare_gpt, lm_runs
    ckpt = str(root / "fp" / CHECKPOINT_NAME)
    with one_thread():
        results = [bench.run_one(size, ckpt, str(tmp_path), texts, *cell)
                   for cell in bench.cells(size, ("fp", "rounding", "cbp"), ("ternary",))]
    fp, rounding, cbp_row = results
    assert cbp_row["epochs"] == 3 and cbp_row["g"] == 4  # g 1 -> 2 -> 3 -> 4 > 3
    assert cbp_row["cfs"] < rounding["cfs"] and 0 < cbp_row["packed_bytes"] < cbp_row["float_bytes"]
    for r in results:
        assert r["bpc"] == pytest.approx(r["val_loss"] / math.log(2))
        assert r["sample"].startswith("ROMEO:") and len(r["sample"]) == 306
    text = bench.table(results, size, ["ternary"])
    assert text.count("\n| ") == 4 and "CBP (window schedule)" in text
    assert "## CBP (window schedule), ternary" in bench.samples(results)
    # eta_lambda is chosen on the last validation windows, never on the reported first ones
    _, _, test, tune = bench.datasets(size, texts)
    assert not set(test.indices) & set(tune.indices) and max(tune.indices) == len(tune.dataset) - 1
    with one_thread():
        tuned = [bench.run_one(bench.replace(size, multiplier_lr=eta), ckpt, str(tmp_path), texts,
                               "cbp", "ternary", bench.TUNE_SEED, "tune") for eta in (1e-3, 1e-1)]
    assert all(r["split"] == "tune" and "sample" not in r for r in tuned)
    best = min(tuned, key=lambda r: r["val_loss"])["multiplier_lr"]
    assert f"Chosen for ternary: η_λ = {best:g}" in bench.tune_table(tuned, size)
    with pytest.raises(ValueError, match="without overlapping"):
        bench.datasets(bench.replace(size, test_windows=10**6), texts)


def test_compare_gpt_recipes_cells_results_file_and_table(compare_gpt, lm_runs, tmp_path):
    """compare_gpt.py --recipes: a distilled per-channel STE cell trains with the float teacher
    (both loss terms logged); cells in a results file are read back instead of recomputed, the
    table is rebuilt from the file, and cells of two code versions are refused."""
    (bench, tiny), (root, texts) = compare_gpt, lm_runs
    size = bench.replace(tiny, seeds=2)
    ckpt = str(root / "fp" / CHECKPOINT_NAME)
    with one_thread():
        cell = bench.run_one(size, ckpt, str(tmp_path), texts, "ste+kd+pc", "ternary", 1)
    assert cell["method"] == "ste+kd+pc" and cell["on_levels"] < 1   # STE: latent weights float
    log = read_jsonl(str(tmp_path / "runs" / "ste+kd+pc-ternary-1-1x-0.1" / LOG_NAME))
    assert {"task_loss", "distill_loss"} <= set(log[-1])
    # a results file holding every cell: nothing is recomputed, the table comes from the file
    results = str(tmp_path / "gpt.jsonl")
    methods = ("fp", "ste", "ste+kd+pc")
    fake = [{"method": m, "levels": lv, "seed": s, "split": "test", "val_loss": 2.0 - 0.1 * s
             - (0.05 + 0.02 * s if m == "ste+kd+pc" else 0), "cfs": 0.01, "model": "gpt",
             "key": bench.cell_key(size), "settings": bench.settings_of(size), "version": {"v": 1}}
            for m, lv, s in bench.cells(size, methods, ("ternary",))]
    bench.compare.save_results(results, fake)
    read = bench.run_all(size, ckpt, str(tmp_path), texts, methods, ("ternary",), 1, results)
    assert read == fake   # in the order of the cells, none recomputed
    text = bench.recipes_table(bench.committed(results, size, methods, ("ternary",)), size)
    row = next(line for line in text.splitlines() if "distillation + per-channel" in line)
    assert "-0.0600 ± 0.0100" in row and "| 0.945 |" in row   # (1.95 + 1.83) / 2 / fp 2.0
    other = [{**r, "key": "another"} for r in fake if r["method"] == "ste"]
    bench.compare.save_results(results, other)
    with pytest.raises(ValueError, match="2 code versions"):
        bench.committed(results, size, methods, ("ternary",))
