"""The Fisher stage: exact against brute-force per-example autograd, invariant to batching and
ranks, named like the source checkpoint, and loud about bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.files import read_safetensors_header
from fisher.__main__ import PLOT_FILE, SUMMARY_FILE, compute_and_write, main
from fisher.config import config_from_dict
from fisher.data import load_examples
from fisher.estimator import Accumulator
from fisher.file import FISHER_FILE, METADATA_KEY
from stack.tiny import save_tiny_decoder, save_tiny_gemma4

from .conftest import REPO, free_port
from .fisher_support import brute_force_fisher, poison_layer, rows_for, tracked_weights, write_jsonl

FORMATS = ["messages", "prompt_completion", "conversational_prompt_completion", "text"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_decoder(tmp_path_factory.mktemp("fisher-llama"), "llama", num_hidden_layers=3)


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    """A 12-layer Gemma-4 with PLE, KV sharing (4 shared) and both attention types."""
    return save_tiny_gemma4(tmp_path_factory.mktemp("fisher-gemma4"), num_hidden_layers=12, num_kv_shared_layers=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fisher-data")
    return {name: write_jsonl(folder / f"{name}.jsonl", rows_for(name)) for name in FORMATS}


def make_config(model, data_path, out, **overrides):
    base = dict(model=str(model), datasets=[{"path": str(data_path)}], out=str(out), dtype="float32", batch_size=3,
                max_length=64)
    return config_from_dict({**base, **overrides})


def fisher_of(config) -> dict[str, torch.Tensor]:
    compute_and_write(config)
    return load_file(os.path.join(config.out, FISHER_FILE))


def metadata_of(config) -> dict:
    with safe_open(os.path.join(config.out, FISHER_FILE), "pt") as f:
        return json.loads(f.metadata()[METADATA_KEY])


def reference(config, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).eval()
    examples, _ = load_examples(config, AutoTokenizer.from_pretrained(config.model))
    return brute_force_fisher(model, examples, mode=config.mode, seed=config.seed, num_samples=config.num_samples,
                              **kwargs)


def assert_fisher_close(actual: dict, expected: dict, rtol=1e-4):
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = float(expected[name].abs().max())
        assert scale > 0, f"{name}: the reference is all zeros, the comparison would be empty"
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


# ---- exactness -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["empirical", "true"])
@pytest.mark.parametrize("format_name", FORMATS)
def test_equals_brute_force_per_example_autograd_llama(llama, data, tmp_path, format_name, mode):
    config = make_config(llama, data[format_name], tmp_path / "out", mode=mode, num_samples=2 if mode == "true" else 1,
                         seed=7)
    assert_fisher_close(fisher_of(config), reference(config))


@pytest.mark.parametrize("mode, format_name", [("empirical", "messages"), ("true", "messages"), ("empirical", "text")])
def test_equals_brute_force_per_example_autograd_gemma4(gemma4, data, tmp_path, mode, format_name):
    config = make_config(gemma4, data[format_name], tmp_path / "out", mode=mode, seed=3)
    fisher = fisher_of(config)
    assert any("per_layer_input_gate" in n for n in fisher) and any("per_layer_projection" in n for n in fisher)
    assert not any(".layers.9.self_attn.k_proj" in n for n in fisher)  # KV-shared layers have no k_proj
    assert_fisher_close(fisher, reference(config))


def test_the_brute_force_comparison_can_fail(llama, data, tmp_path):
    """Squaring the batch gradient instead of each example's (the classic mistake) is caught."""
    config = make_config(llama, data["messages"], tmp_path / "out")
    expected = reference(config)
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    examples, _ = load_examples(config, AutoTokenizer.from_pretrained(llama))
    weights = tracked_weights(model)
    for w in weights.values():
        w.requires_grad_(True)
    total = sum(-torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1],
                                                    torch.tensor(e.labels[1:]), ignore_index=-100, reduction="sum")
                for e in examples)
    grads = torch.autograd.grad(total, list(weights.values()))
    batch_squared = {n: g.square() / len(examples) for n, g in zip(weights, grads)}
    with pytest.raises(AssertionError):
        assert_fisher_close(batch_squared, expected)


def test_batch_size_does_not_change_the_result(llama, data, tmp_path):
    results = [fisher_of(make_config(llama, data["messages"], tmp_path / f"b{b}", batch_size=b)) for b in (1, 4)]
    assert_fisher_close(results[0], results[1], rtol=1e-5)


def test_gradient_checkpointing_does_not_change_the_result(llama, data, tmp_path):
    plain = fisher_of(make_config(llama, data["text"], tmp_path / "plain"))
    checkpointed = fisher_of(make_config(llama, data["text"], tmp_path / "ckpt", gradient_checkpointing=True))
    assert_fisher_close(checkpointed, plain, rtol=1e-5)


def test_per_token_estimator_is_labelled_approximate(llama, data, tmp_path):
    config = make_config(llama, data["text"], tmp_path / "out", estimator="per_token")
    approx, exact = fisher_of(config), reference(config)
    assert metadata_of(config)["approximate"] is True
    assert approx.keys() == exact.keys()
    assert any(not torch.allclose(approx[n], exact[n], rtol=1e-3) for n in exact)


def test_two_processes_equal_one(llama, data, tmp_path):
    single = fisher_of(make_config(llama, data["messages"], tmp_path / "one"))
    recipe = tmp_path / "fisher.yaml"
    recipe.write_text(json.dumps(dict(model=str(llama), datasets=[{"path": str(data["messages"])}],
                                      out=str(tmp_path / "two"), dtype="float32", batch_size=2, max_length=64)))
    # torchrun-style launch of 2 ranks; ACCELERATE_USE_CPU makes them MULTI_CPU over gloo (`--cpu` would start only
    # one).
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "fisher", str(recipe)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, cwd=REPO, env=env, timeout=300)
    with safe_open(tmp_path / "two" / FISHER_FILE, "pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY])["world_size"] == 2
    assert_fisher_close(load_file(tmp_path / "two" / FISHER_FILE), single, rtol=1e-5)


# ---- outputs -----------------------------------------------------------------------------------------------


def test_names_and_shapes_match_the_source_checkpoint(gemma4, data, tmp_path):
    fisher = fisher_of(make_config(gemma4, data["messages"], tmp_path / "out"))
    source = read_safetensors_header(gemma4 / "model.safetensors")
    # Every 2-D tensor of the text decoder layers is a Linear weight (norms and layer_scalar are 1-D).
    assert set(fisher) == {n for n, info in source.items()
                           if n.startswith("model.language_model.layers.") and len(info.shape) == 2}
    for name, values in fisher.items():
        assert tuple(values.shape) == source[name].shape and values.dtype == torch.float32
        assert bool((values >= 0).all()) and bool(values.isfinite().all())


def test_metadata_summary_and_plot(llama, data, tmp_path):
    config = make_config(llama, data["prompt_completion"], tmp_path / "out", max_length=8)
    fisher_of(config)
    meta = metadata_of(config)
    for key in ("model", "model_shard_sha256", "datasets", "dataset_rows", "examples_used", "skipped_empty_loss_mask",
                "skipped_nonfinite", "truncated", "loss_tokens", "mode", "max_length", "seed", "approximate",
                "versions"):
        assert key in meta, key
    assert meta["dataset_rows"] == {str(data["prompt_completion"]): 6} and meta["approximate"] is False
    assert meta["truncated"] > 0 and meta["loss_tokens"] > 0 and meta["versions"]["trl"] == "1.16.0"
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert set(summary["mass_per_layer"]) == {"0", "1", "2"}
    assert abs(sum(summary["mass_per_type"].values()) - summary["total_mass"]) < 1e-6 * summary["total_mass"]
    q_proj = summary["concentration"]["q_proj"]
    assert 0 < q_proj["top1pct_inputs"] <= q_proj["top10pct_inputs"] <= 1
    assert (tmp_path / "out" / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tokens_are_exactly_sft_trainers(llama, data, tmp_path):
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(llama)
    for format_name in FORMATS:
        config = make_config(llama, data[format_name], tmp_path / "out", max_length=1024)
        ours, _ = load_examples(config, tokenizer)
        conversational = format_name == "messages"
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(llama), processing_class=tokenizer,
            train_dataset=load_dataset("json", data_files=str(data[format_name]), split="train"),
            args=SFTConfig(output_dir=str(tmp_path / "sft"), assistant_only_loss=conversational, report_to=[],
                           max_length=1024, bf16=False, use_cpu=True, activation_checkpointing=False),
        )
        theirs = trainer.train_dataset
        assert [e.input_ids for e in ours] == theirs["input_ids"], format_name
        assert [e.labels for e in ours] == theirs["labels"], format_name


# ---- bad input ------------------------------------------------------------------------------------------------


def run_cli(tmp_path, caplog, **config) -> int:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(json.dumps({"dtype": "float32", "out": str(tmp_path / "out"), **config}))
    return main([str(recipe)])


def test_missing_column(llama, data, tmp_path, caplog):
    datasets = [{"path": str(data["text"]), "columns": {"text": "body"}}]
    assert run_cli(tmp_path, caplog, model=str(llama), datasets=datasets) == 2
    assert "has no column(s) ['body']; its columns are ['text']" in caplog.text
    assert not (tmp_path / "out").exists()


def test_columns_in_no_trl_format(llama, tmp_path, caplog):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "w1", "answer": "w2"}])
    assert run_cli(tmp_path, caplog, model=str(llama), datasets=[{"path": str(path)}]) == 2
    assert "has columns ['question', 'answer'], none in a TRL format" in caplog.text


def test_column_mapping_selects_columns(llama, tmp_path):
    rows = [{"question": "w1 w2", "answer": "w3", "id": 1}, {"question": "w4", "answer": "w5 w6", "id": 2}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    columns = {"prompt": "question", "completion": "answer"}
    config = make_config(llama, path, tmp_path / "out", datasets=[{"path": str(path), "columns": columns}])
    fisher_of(config)
    assert metadata_of(config)["examples_used"] == 2


def test_rows_with_empty_loss_mask_are_skipped_and_counted(llama, tmp_path, caplog):
    rows = rows_for("messages", 4) + [{"messages": [{"role": "user", "content": "w1 w2"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    config = make_config(llama, path, tmp_path / "out")
    fisher_of(config)
    meta = metadata_of(config)
    assert meta["skipped_empty_loss_mask"] == 1 and meta["examples_used"] == 4
    assert "row(s) have no assistant turn (empty loss mask), skipped; first rows: [4]" in caplog.text


def test_rows_over_max_length_are_truncated_and_counted(llama, data, tmp_path):
    config = make_config(llama, data["text"], tmp_path / "out", max_length=5)
    fisher_of(config)
    examples, stats = load_examples(config, AutoTokenizer.from_pretrained(llama))
    assert stats.truncated == metadata_of(config)["truncated"] > 0
    assert max(len(e.input_ids) for e in examples) == 5


def test_conversational_data_needs_a_chat_template(llama, data, tmp_path, caplog):
    plain = tmp_path / "no-template"
    plain.mkdir()
    for path in llama.iterdir():
        if path.name != "chat_template.jinja":
            (plain / path.name).write_bytes(path.read_bytes())
    assert run_cli(tmp_path, caplog, model=str(plain), datasets=[{"path": str(data["messages"])}]) == 2
    assert "is conversational but the tokenizer of" in caplog.text and "has no chat template" in caplog.text


def test_missing_data_path(llama, tmp_path, caplog):
    assert run_cli(tmp_path, caplog, model=str(llama), datasets=[{"path": str(tmp_path / "nope.jsonl")}]) == 2
    assert "data path" in caplog.text and "nope.jsonl' does not exist" in caplog.text


def test_unknown_config_key(llama, data, tmp_path, caplog):
    assert run_cli(tmp_path, caplog, model=str(llama), datasets=[{"path": str(data["text"])}], batchsize=2) == 2
    assert "unknown key(s) ['batchsize']" in caplog.text


# ---- non-finite gradients ----------------------------------------------------------------------------------------


@pytest.fixture
def poison_one_example(monkeypatch):
    """Make one example's output gradient non-finite at one mid-network Linear: modules after it (in
    backward order: later layers) have already added that example when the NaN appears."""
    import fisher.__main__ as fisher_main

    original = fisher_main.prepare_for_fisher
    poisoned_token = 7  # "w1": rows containing it get a NaN gradient at layer 1's down_proj

    def prepare(model, config):
        original(model, config)
        captured = {}
        model.get_input_embeddings().register_forward_hook(lambda m, a, o: captured.update(ids=a[0]))

        def poison(module, args, output):
            rows = (captured["ids"] == poisoned_token).any(dim=1)
            if output.requires_grad and rows.any():
                output.register_hook(lambda g: torch.where(rows[:, None, None], torch.full_like(g, float("nan")), g))

        model.model.layers[1].mlp.down_proj.register_forward_hook(poison)

    monkeypatch.setattr(fisher_main, "prepare_for_fisher", prepare)
    return poisoned_token


def test_nonfinite_examples_are_skipped_exactly(llama, tmp_path, poison_one_example):
    rows = [{"text": "w2 w3 w4"}, {"text": "w5 w1 w6 w8"}, {"text": "w9 w10"}, {"text": "w11 w12 w13"}]
    path = write_jsonl(tmp_path / "text.jsonl", rows)
    config = make_config(llama, path, tmp_path / "out", max_nonfinite_share=0.5, batch_size=4)
    fisher = fisher_of(config)
    assert metadata_of(config)["skipped_nonfinite"] == 1
    clean_rows = write_jsonl(tmp_path / "clean.jsonl", [r for r in rows if "w1 " not in r["text"]])
    clean = make_config(llama, clean_rows, tmp_path / "ref")
    assert_fisher_close(fisher, reference(clean), rtol=1e-4)


def test_too_many_nonfinite_examples_fail(llama, tmp_path, caplog, poison_one_example):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "w2 w3"}, {"text": "w5 w1 w6"}])
    assert run_cli(tmp_path, caplog, model=str(llama), datasets=[{"path": str(path)}], max_nonfinite_share=0.1) == 2
    assert "1 of 2 examples (50.0%) had non-finite gradients, above max_nonfinite_share=0.1" in caplog.text
    assert not (tmp_path / "out").exists()


def test_fisher_recipe_loads():
    from fisher.config import load_config

    config = load_config(REPO / "recipes" / "fisher.yaml")
    assert config.model == "google/gemma-4-E4B-it" and config.mode == "empirical" and not config.approximate


# ---- data sources and mixing -------------------------------------------------------------------------------------


def test_parquet_and_save_to_disk_sources_give_the_jsonl_result(llama, data, tmp_path):
    from datasets import load_dataset

    rows = load_dataset("json", data_files=str(data["messages"]), split="train")
    rows.to_parquet(str(tmp_path / "chat.parquet"))
    rows.save_to_disk(str(tmp_path / "chat-arrow"))
    expected = fisher_of(make_config(llama, data["messages"], tmp_path / "jsonl"))
    for source in (tmp_path / "chat.parquet", tmp_path / "chat-arrow"):
        fisher = fisher_of(make_config(llama, source, tmp_path / f"out-{source.stem}"))
        assert_fisher_close(fisher, expected, rtol=1e-6)


def test_datasets_are_mixed_by_weight(llama, data, tmp_path):
    config = make_config(llama, data["text"], tmp_path / "out", num_examples=6, datasets=[
        {"path": str(data["text"]), "weight": 2.0}, {"path": str(data["prompt_completion"]), "weight": 1.0}])
    fisher_of(config)
    assert metadata_of(config)["dataset_rows"] == {str(data["text"]): 4, str(data["prompt_completion"]): 2}
    examples, _ = load_examples(config, AutoTokenizer.from_pretrained(llama))
    assert sorted({e.dataset_index for e in examples}) == [0, 1] and len(examples) == 6


def test_a_chat_template_without_generation_markers_is_a_clear_error(llama, data, tmp_path, caplog):
    plain = tmp_path / "plain-template"
    plain.mkdir()
    for path in llama.iterdir():
        (plain / path.name).write_bytes(path.read_bytes())
    (plain / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert run_cli(tmp_path, caplog, model=str(plain), datasets=[{"path": str(data["messages"])}]) == 2
    assert "marks no assistant tokens" in caplog.text and "assistant_only_loss: false" in caplog.text
    assert run_cli(tmp_path, caplog, model=str(plain), datasets=[{"path": str(data["messages"])}],
                   assistant_only_loss=False) == 0


def test_bf16_weights_accumulate_in_fp32(llama, data, tmp_path):
    fp32 = fisher_of(make_config(llama, data["text"], tmp_path / "fp32"))
    bf16 = fisher_of(make_config(llama, data["text"], tmp_path / "bf16", dtype="bfloat16"))
    assert all(t.dtype == torch.float32 for t in bf16.values())
    assert_fisher_close(bf16, fp32, rtol=0.1)  # bf16 activations; the sums are fp32


def test_unreachable_model_says_how_to_pass_a_local_one(data, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_cli(tmp_path, caplog, model="nobody/not-cached-model", datasets=[{"path": str(data["text"])}]) == 2
    assert "is not in the local HF cache" in caplog.text


# ---- memory: chunked LM head, per-layer-group passes ----------------------------------------------------------


def random_head(vocab: int, hidden: int, softcap: float | None, seed: int = 0):
    from core.logits import LogitHead

    generator = torch.Generator().manual_seed(seed)
    return LogitHead(torch.randn(vocab, hidden, generator=generator), torch.randn(vocab, generator=generator), softcap)


def reference_log_likelihood(hidden: torch.Tensor, labels: torch.Tensor, head) -> torch.Tensor:
    """The unchunked formula over full [B, T, V] logits, in float64, written out independently of fisher/."""
    z = hidden.double() @ head.weight.double().T + head.bias.double()
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    targets = labels[:, 1:]
    picked = torch.log_softmax(z[:, :-1], dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != -100, picked, 0.0).sum(1)


def chunked_and_reference(head, chunk_size: int):
    """ℓ [B] and d(Σ_b w_b ℓ_b)/d hidden, chunked (fisher/) and by the float64 reference, on padded random data."""
    from fisher.estimator import per_example_log_likelihood

    generator = torch.Generator().manual_seed(1)
    batch, length, vocab, width = 3, 11, head.weight.shape[0], head.weight.shape[1]
    hidden = torch.randn(batch, length, width, generator=generator) * 3
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[0, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    weights = torch.randn(batch, generator=generator, dtype=torch.float64)  # a generic upstream gradient
    chunked = hidden.clone().requires_grad_(True)
    reference = hidden.double().requires_grad_(True)
    results = []
    for h, value in ((chunked, per_example_log_likelihood(chunked, labels, head, chunk_size)),
                     (reference, reference_log_likelihood(reference, labels, head))):
        (grad,) = torch.autograd.grad((value.double() * weights).sum(), h)
        results.append((value.double(), grad.double()))
    return results


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])  # 22 loss positions: 4 and 7 do not divide them
def test_chunked_log_likelihood_and_gradient_equal_the_full_logit_reference(softcap, chunk_size):
    (value, grad), (expected_value, expected_grad) = chunked_and_reference(random_head(50, 16, softcap), chunk_size)
    torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=1e-4)  # fp32 logits vs the float64 reference
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)
    assert bool(grad[2, 7:].eq(0).all()) and bool(grad[:, -1].eq(0).all())  # no label: no gradient


def test_the_log_likelihood_comparison_catches_a_missing_softcap_derivative():
    from core.logits import LogitHead

    class UncappedBackward(LogitHead):
        def backward_through(self, grad_logits, logits):
            return grad_logits @ self.weight

    head = random_head(50, 16, 3.0)
    (_, grad), (_, expected_grad) = chunked_and_reference(UncappedBackward(head.weight, head.bias, head.softcap), 4)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor (in elements) that any op creates while active, forward and backward."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


def test_log_likelihood_never_builds_logits_for_a_whole_sequence():
    from fisher.estimator import per_example_log_likelihood

    head, chunk = random_head(1000, 8, 30.0), 16
    hidden = torch.randn(2, 200, 8, requires_grad=True)
    labels = torch.randint(0, 1000, (2, 200))
    with LargestTensor() as chunked:
        per_example_log_likelihood(hidden, labels, head, chunk).sum().backward()
    assert chunked.numel <= chunk * 1000  # one chunk's [chunk, V] logits; a sequence's would be 200 · 1000
    with LargestTensor() as full:  # negative control: the full-logit formula is seen by the same probe
        reference_log_likelihood(hidden, labels, head).sum().backward()
    assert full.numel >= 2 * 199 * 1000


def test_sampled_labels_do_not_depend_on_the_chunk_size():
    from core.logits import sample_tokens, sample_tokens_chunked

    head = random_head(300, 8, 30.0)
    hidden, uniforms = torch.randn(23, 8) * 2, torch.rand(23, generator=torch.Generator().manual_seed(3))
    at_once = sample_tokens(head.logits(hidden), uniforms)
    for chunk in (1, 4, 7, 23, 100):
        assert torch.equal(sample_tokens_chunked(hidden, uniforms, head, chunk), at_once), chunk
    assert len(set(at_once.tolist())) > 5  # the draws are not degenerate


def test_sampled_labels_follow_the_predictive_distribution():
    from core.logits import sample_tokens

    logits = torch.tensor([2.0, 0.0, float("-inf"), 1.0, -1.0, float("-inf")])  # tokens 2 and 5: probability 0
    probs = torch.softmax(logits, dim=0)
    draws = sample_tokens(logits.expand(20000, -1), torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    frequencies = torch.bincount(draws, minlength=6).float() / 20000
    assert frequencies[2] == 0 and frequencies[5] == 0
    torch.testing.assert_close(frequencies, probs, rtol=0, atol=0.01)  # 4 standard deviations at 20,000 draws
    with pytest.raises(AssertionError):  # negative control: the check tells apart a nearby distribution
        torch.testing.assert_close(frequencies, torch.softmax(logits * 1.2, dim=0), rtol=0, atol=0.01)


class RecordingAccumulator(Accumulator):
    """Records, per `hooked` context (one pass over the data), the modules whose inputs its hooks kept."""

    def __init__(self, modules):
        super().__init__(modules)
        self.passes: list[set[str]] = []

    def hooked(self, names=None, offload=False):
        self.passes.append(set())
        return super().hooked(names, offload)

    def _on_forward(self, module, args, output):
        self.passes[-1].add(self.names[module])
        super()._on_forward(module, args, output)


def fisher_in_process(model_dir, data_path, runs: list[dict]):
    """run_fisher on one model object, once per dict of config overrides in `runs`: per run, the accumulator
    (sums, and the modules hooked in each pass), the counts, and how often the LM head module ran."""
    from fisher.estimator import decoder_linears
    from fisher.run import prepare_for_fisher, run_fisher

    configs = [make_config(model_dir, data_path, "unused", **overrides) for overrides in runs]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prepare_for_fisher(model, configs[0])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = load_examples(configs[0], tokenizer)
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    results = []
    for config in configs:
        accumulator = RecordingAccumulator(decoder_linears(model))
        counts = run_fisher(model, accumulator, examples, config, tokenizer.pad_token_id)
        results.append((accumulator, counts, len(head_calls)))
    return results


@pytest.mark.parametrize("model_name, groups, mode", [("llama", 3, "true"), ("gemma4", 5, "empirical")])
def test_layer_groups_give_the_one_pass_result_bit_for_bit(request, data, model_name, groups, mode):
    options = dict(mode=mode, num_samples=2 if mode == "true" else 1, seed=5)
    (one, one_counts, _), (split, split_counts, head_calls) = fisher_in_process(
        request.getfixturevalue(model_name), data["messages"], [options, {**options, "layer_groups": groups}])
    assert head_calls == 0  # the LM head module never runs: logits come from core.logits, a chunk at a time
    assert one.sums.keys() == split.sums.keys() and one_counts == split_counts
    for name in one.sums:  # same graph, same order of additions: identical, not merely close
        assert torch.equal(split.sums[name], one.sums[name]), name
    # Each pass hooked one contiguous group of layers only (so held ~1/groups of the inputs); one pass hooks all.
    assert len(one.passes) == 1 and one.passes[0] == set(one.modules)
    assert len(split.passes) == groups and set().union(*split.passes) == set(split.modules)
    layers_hooked = [sorted({int(n.split(".layers.")[1].split(".")[0]) for n in names}) for names in split.passes]
    assert [layers[0] for layers in layers_hooked[1:]] == [layers[-1] + 1 for layers in layers_hooked[:-1]]
    assert max(len(layers) for layers in layers_hooked) - min(len(layers) for layers in layers_hooked) <= 1


def test_more_layer_groups_than_layers_is_a_clear_error(llama, data, tmp_path, caplog):
    assert run_cli(tmp_path, caplog, model=str(llama), datasets=[{"path": str(data["text"])}], layer_groups=4) == 2
    assert "layer_groups 4 is more than the decoder's 3 layers; use 1 to 3" in caplog.text


@pytest.fixture
def poison_top_layer_only(monkeypatch):
    """A NaN output gradient at the last layer's down_proj for rows holding token 7 ("w1"), zeroed again at
    its input: only that module sees it. A bottom-up per-layer-group pass has then already added the example
    in the lower groups when the top group finds it, and must take it out of them again."""
    import fisher.__main__ as fisher_main

    original = fisher_main.prepare_for_fisher

    poison = poison_layer(-1, only_there=True)

    def prepare(model, config):
        original(model, config)
        poison(model)

    monkeypatch.setattr(fisher_main, "prepare_for_fisher", prepare)


def test_layer_groups_skip_a_nonfinite_example_in_every_group(llama, tmp_path, poison_top_layer_only):
    rows = [{"text": "w2 w3 w4"}, {"text": "w5 w1 w6 w8"}, {"text": "w9 w10"}, {"text": "w11 w12 w13"}]
    path = write_jsonl(tmp_path / "text.jsonl", rows)
    config = make_config(llama, path, tmp_path / "out", max_nonfinite_share=0.5, batch_size=2, layer_groups=3)
    fisher = fisher_of(config)
    assert metadata_of(config)["skipped_nonfinite"] == 1
    clean_rows = [r for r in rows if "w1 " not in r["text"]]
    clean = make_config(llama, write_jsonl(tmp_path / "clean.jsonl", clean_rows), tmp_path / "ref")
    assert_fisher_close(fisher, reference(clean), rtol=1e-4)
