"""The Fisher stage's K-FAC factors (`factors: true`): equal to a brute-force computation, invariant to batching,
layer groups and ranks, written under the Fisher's names, limited to the seam slots' source layers with
factor_stack, and absent (with the Fisher unchanged) by default. Also the file format of fisher/factors.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from fisher.__main__ import SUMMARY_FILE, compute_and_write, main
from fisher.config import ConfigError, config_from_dict
from fisher.data import load_examples
from fisher.estimator import Accumulator, FactorSums, decoder_linears, example_generator
from fisher.factors import (
    FACTORS_FILE,
    Eigenbasis,
    FactorsFileError,
    ModuleFactors,
    load_factors,
    save_factors,
    top_eigenbasis,
)
from fisher.file import FISHER_FILE, METADATA_KEY
from fisher.run import prepare_for_fisher, run_fisher
from stack.tiny import save_tiny_decoder, save_tiny_gemma4

from .conftest import REPO, free_port, run_stack, write_recipe
from .fisher_support import poison_layer, rows_for, sample_labels, write_jsonl

Moments = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A / T, G / T)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_decoder(tmp_path_factory.mktemp("factors-llama"), "llama", num_hidden_layers=3)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """Conversations of different lengths: every batch of 3 holds padding."""
    return write_jsonl(tmp_path_factory.mktemp("factors-data") / "chat.jsonl", rows_for("messages", 7))


def make_config(model, data_path, out, **overrides):
    base = dict(model=str(model), datasets=[{"path": str(data_path)}], out=str(out), dtype="float32", batch_size=3,
                max_length=64, factors=True, factor_energy_share=1.0, factor_max_rank=10_000)
    return config_from_dict({**base, **overrides})


def assert_moments_close(actual: Moments, expected: Moments, rtol: float):
    assert actual.keys() == expected.keys()
    for name, pair in expected.items():
        for side, want, got in zip(("A", "G"), pair, actual[name]):
            scale = float(want.abs().max())
            assert scale > 0, f"{name} {side}: the reference is all zeros, the comparison would be empty"
            torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=lambda m, n=name, s=side: f"{n} "
                                       f"{s}: {m}")


# ---- a brute-force reference, written independently of fisher/ ---------------------------------------------------


def brute_force_factors(model, examples, mode="empirical", seed=0, num_samples=1) -> Moments:
    """Per decoder Linear, (Σ x xᵀ / T, Σ g gᵀ / T) over every position of every (example, label sample), one
    unpadded example at a time with plain autograd: x the Linear's input, g = ∂ℓ/∂(its output)."""
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and ".layers." in name and "tower" not in name}
    inputs = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears.items()}
    outputs = {name: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for name, m in linears.items()}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            seen[name] = (args[0].detach()[0].double(), output)
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in linears.items()]
    tokens = 0
    for example in examples:
        input_ids, labels = torch.tensor([example.input_ids]), torch.tensor(example.labels)
        for sample in range(num_samples):
            logits = model(input_ids=input_ids).logits[0]
            targets = labels if mode == "empirical" else sample_labels(
                logits.detach(), labels, example_generator(seed, example.example_id, sample, logits.device))
            log_likelihood = -F.cross_entropy(logits[:-1].float(), targets[1:], ignore_index=-100, reduction="sum")
            log_likelihood.backward()
            for name, (x, output) in seen.items():
                g = output.grad[0].double()
                inputs[name] += x.T @ x
                outputs[name] += g.T @ g
            tokens += len(example.input_ids)
            model.zero_grad()
    for handle in handles:
        handle.remove()
    return {name: ((inputs[name] / tokens).float(), (outputs[name] / tokens).float()) for name in linears}


def reference(config) -> Moments:
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).eval()
    examples, _ = load_examples(config, AutoTokenizer.from_pretrained(config.model))
    return brute_force_factors(model, examples, config.mode, config.seed, config.num_samples)


def factors_in_process(model_dir, data_path, runs: list[dict], sums_class=FactorSums, poison=None):
    """run_fisher on one model object, once per dict of config overrides in `runs`: per run, the accumulator (its
    `factors` the FactorSums of every decoder Linear). `poison(model)` may add hooks first."""
    configs = [make_config(model_dir, data_path, "unused", **overrides) for overrides in runs]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prepare_for_fisher(model, configs[0])
    if poison is not None:
        poison(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = load_examples(configs[0], tokenizer)
    accumulators = []
    for config in configs:
        modules = decoder_linears(model)
        accumulator = Accumulator(modules, config.estimator, config.examples_per_chunk, sums_class(list(modules)))
        run_fisher(model, accumulator, examples, config, tokenizer.pad_token_id)
        accumulators.append(accumulator)
    return accumulators


def means(accumulator: Accumulator) -> Moments:
    return {name: accumulator.factors.mean(name) for name in sorted(accumulator.factors.inputs)}


def moments_from_file(path: Path) -> Moments:
    """V diag(λ) Vᵀ of each stored basis: the moment itself when the basis is complete (energy share 1)."""
    factors, _ = load_factors(path)
    rebuild = lambda b: (b.vectors * b.values) @ b.vectors.T  # noqa: E731
    return {name: (rebuild(f.input), rebuild(f.output)) for name, f in factors.items()}


# ---- exactness -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["empirical", "true"])
def test_factors_equal_brute_force_with_padding_in_the_batch(llama, chat, mode):
    overrides = dict(mode=mode, num_samples=2 if mode == "true" else 1, seed=4)
    (accumulator,) = factors_in_process(llama, chat, [overrides])
    config = make_config(llama, chat, "unused", **overrides)
    examples, _ = load_examples(config, AutoTokenizer.from_pretrained(llama))
    assert len({len(e.input_ids) for e in examples[:3]}) > 1  # the first batch is padded
    expected = reference(config)
    assert_moments_close(means(accumulator), expected, rtol=1e-4)
    tokens = {int(t) for t in accumulator.factors.tokens.values()}
    assert tokens == {sum(len(e.input_ids) for e in examples) * config.num_samples}


def test_the_brute_force_comparison_catches_padding_counted(llama, chat):
    """Negative control: sums that count the padding positions (x is not 0 there) fail the comparison."""

    class CountingPadding(FactorSums):
        def add(self, name, x, g, positions, sign):
            super().add(name, x, g, torch.ones_like(positions), sign)

    (accumulator,) = factors_in_process(llama, chat, [{}], sums_class=CountingPadding)
    with pytest.raises(AssertionError):
        assert_moments_close(means(accumulator), reference(make_config(llama, chat, "unused")), rtol=1e-4)


def test_the_file_holds_the_moments_under_the_fisher_names(llama, chat, tmp_path):
    config = make_config(llama, chat, tmp_path / "out")
    compute_and_write(config)
    fisher = load_file(tmp_path / "out" / FISHER_FILE)
    moments = moments_from_file(tmp_path / "out" / FACTORS_FILE)
    assert set(moments) == {name.removesuffix(".weight") for name in fisher}
    assert_moments_close(moments, reference(config), rtol=1e-4)


@pytest.mark.parametrize("layer, only_there, groups", [(1, False, 1), (-1, True, 3)])
def test_an_example_left_out_of_the_fisher_is_left_out_of_the_factors(llama, tmp_path, layer, only_there, groups):
    rows = [{"text": "w2 w3 w4"}, {"text": "w5 w1 w6 w8"}, {"text": "w9 w10"}, {"text": "w11 w12 w13"}]
    path = write_jsonl(tmp_path / "text.jsonl", rows)
    (accumulator,) = factors_in_process(llama, path, [dict(batch_size=2, layer_groups=groups)],
                                        poison=poison_layer(layer, only_there))
    clean = write_jsonl(tmp_path / "clean.jsonl", [r for r in rows if "w1 " not in r["text"]])
    assert_moments_close(means(accumulator), reference(make_config(llama, clean, "unused")), rtol=1e-4)


# ---- invariance -------------------------------------------------------------------------------------------------


def test_batch_size_and_gradient_checkpointing_do_not_change_the_factors(llama, chat):
    one, four, checkpointed = factors_in_process(llama, chat, [dict(batch_size=1), dict(batch_size=4),
                                                               dict(batch_size=4, gradient_checkpointing=True)])
    assert_moments_close(means(four), means(one), rtol=1e-5)
    assert_moments_close(means(checkpointed), means(one), rtol=1e-5)


def test_layer_groups_and_chunks_give_the_one_pass_factors_bit_for_bit(llama, chat):
    one, split, chunked = factors_in_process(llama, chat, [{}, dict(layer_groups=3), dict(examples_per_chunk=2)])
    for other in (split, chunked):
        for sums in ("inputs", "outputs", "tokens"):
            mine, theirs = getattr(one.factors, sums), getattr(other.factors, sums)
            assert mine.keys() == theirs.keys()
            for name in mine:  # same graph, same order of additions: identical, not merely close
                assert torch.equal(theirs[name].cpu(), mine[name].cpu()), (sums, name)


def test_two_processes_equal_one(llama, chat, tmp_path):
    compute_and_write(make_config(llama, chat, tmp_path / "one"))
    recipe = tmp_path / "fisher.yaml"
    recipe.write_text(json.dumps(dict(model=str(llama), datasets=[{"path": str(chat)}], out=str(tmp_path / "two"),
                                      dtype="float32", batch_size=2, max_length=64, factors=True,
                                      factor_energy_share=1.0, factor_max_rank=10_000)))
    # As tests/test_fisher.py: 2 ranks, MULTI_CPU over gloo.
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "fisher", str(recipe)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, cwd=REPO, env=env, timeout=300)
    _, one_metadata = load_factors(tmp_path / "one" / FACTORS_FILE)
    _, two_metadata = load_factors(tmp_path / "two" / FACTORS_FILE)
    assert two_metadata["world_size"] == 2 and two_metadata["tokens"] == one_metadata["tokens"]
    assert_moments_close(moments_from_file(tmp_path / "two" / FACTORS_FILE),
                         moments_from_file(tmp_path / "one" / FACTORS_FILE), rtol=1e-5)


# ---- outputs -----------------------------------------------------------------------------------------------------


def test_gemma4_factors_are_named_and_shaped_like_the_fisher(tmp_path):
    """Gemma-4 keeps its decoder under model.language_model: the factors use the Fisher's names, minus ".weight"."""
    model = save_tiny_gemma4(tmp_path / "gemma4", num_hidden_layers=12, num_kv_shared_layers=4)
    data = write_jsonl(tmp_path / "chat.jsonl", rows_for("messages", 4))
    compute_and_write(make_config(model, data, tmp_path / "out", factor_energy_share=0.9, factor_max_rank=8))
    fisher = load_file(tmp_path / "out" / FISHER_FILE)
    factors, metadata = load_factors(tmp_path / "out" / FACTORS_FILE)
    assert set(factors) == {name.removesuffix(".weight") for name in fisher}
    assert all(name.startswith("model.language_model.layers.") for name in factors)
    for name, module_factors in factors.items():
        out_features, in_features = fisher[f"{name}.weight"].shape
        assert module_factors.input.vectors.shape[0] == in_features
        assert module_factors.output.vectors.shape[0] == out_features
        for basis in (module_factors.input, module_factors.output):
            assert 1 <= basis.vectors.shape[1] <= 8
            assert basis.energy >= 0.9 or basis.vectors.shape[1] == 8
    with safe_open(tmp_path / "out" / FISHER_FILE, "pt") as f:
        fisher_metadata = json.loads(f.metadata()[METADATA_KEY])
    for key in ("model", "model_shard_sha256", "datasets", "examples_used", "world_size", "config"):
        assert metadata[key] == fisher_metadata[key], key
    assert metadata["tokens"] > 0 and metadata["energy_share"] == 0.9 and metadata["max_rank"] == 8
    assert metadata["source_layers"] == list(range(12)) and metadata["factor_stack"] is None
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())["factors"]
    assert set(summary) == set(factors)
    first = summary[min(factors)]
    assert first["input_rank"] == factors[min(factors)].input.vectors.shape[1] and 0 < first["input_energy"] <= 1


def test_factors_false_writes_no_factors_file_and_the_same_fisher(llama, chat, tmp_path):
    plain = make_config(llama, chat, tmp_path / "plain", factors=False)
    assert config_from_dict({"model": "m", "datasets": [{"path": "d"}]}).factors is False  # the default
    compute_and_write(plain)
    compute_and_write(make_config(llama, chat, tmp_path / "with"))
    assert not (tmp_path / "plain" / FACTORS_FILE).exists() and (tmp_path / "with" / FACTORS_FILE).is_file()
    assert "factors" not in json.loads((tmp_path / "plain" / SUMMARY_FILE).read_text())
    without, with_factors = load_file(tmp_path / "plain" / FISHER_FILE), load_file(tmp_path / "with" / FISHER_FILE)
    assert without.keys() == with_factors.keys()
    for name in without:
        assert torch.equal(with_factors[name], without[name]), name


# ---- factor_stack --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama6(tmp_path_factory):
    return save_tiny_decoder(tmp_path_factory.mktemp("factors-llama6"), "llama", num_hidden_layers=6)


def layers_of(names) -> set[int]:
    return {int(name.split(".layers.")[1].split(".")[0]) for name in names}


def test_factor_stack_keeps_the_source_layers_of_the_seam_slots_only(llama6, chat, tmp_path):
    """Slots 0-3 are layers 0-3 and slots 4-8 layers 1-5: one seam at slot 4. Width 1 trains slots 3 and 4, whose
    source layers are 3 and 1."""
    stack = tmp_path / "stack"
    assert run_stack(write_recipe(tmp_path / "recipe.yaml", [(0, 4), (1, 6)]), llama6, stack) == 0
    compute_and_write(make_config(llama6, chat, tmp_path / "near", factor_stack=str(stack), factor_seam_width=1))
    near, metadata = load_factors(tmp_path / "near" / FACTORS_FILE)
    assert layers_of(near) == {1, 3} and metadata["source_layers"] == [1, 3]
    assert metadata["factor_stack"] == str(stack) and metadata["factor_seam_width"] == 1
    assert layers_of(load_file(tmp_path / "near" / FISHER_FILE)) == set(range(6))  # the Fisher keeps every layer
    compute_and_write(make_config(llama6, chat, tmp_path / "all"))
    every, _ = load_factors(tmp_path / "all" / FACTORS_FILE)
    assert layers_of(every) == set(range(6))
    for name in near:  # the same sums for the layers both hold
        torch.testing.assert_close(near[name].input.values, every[name].input.values, rtol=0, atol=0)


def test_a_factor_stack_of_another_model_is_a_named_error(llama6, chat, tmp_path, caplog):
    other = save_tiny_decoder(tmp_path / "other", "llama", num_hidden_layers=6, seed=1)
    stack = tmp_path / "stack"
    assert run_stack(write_recipe(tmp_path / "recipe.yaml", [(0, 4), (1, 6)]), other, stack) == 0
    recipe = tmp_path / "fisher.yaml"
    recipe.write_text(json.dumps(dict(model=str(llama6), datasets=[{"path": str(chat)}], out=str(tmp_path / "out"),
                                      factors=True, factor_stack=str(stack))))
    assert main([str(recipe)]) == 2
    assert f"factor_stack {str(stack)!r} was stacked from" in caplog.text and "point factor_stack at" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(factor_energy_share=0.0), "factor_energy_share 0.0 must be in (0, 1]"),
    (dict(factor_energy_share=1.5), "factor_energy_share 1.5 must be in (0, 1]"),
    (dict(factor_max_rank=0), "factor_max_rank must be >= 1, got 0"),
    (dict(factor_seam_width=0), "factor_seam_width must be >= 1, got 0"),
    (dict(factors=False, factor_stack="out/stack"), "factor_stack 'out/stack' is set but factors is false"),
])
def test_bad_factor_options_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({"model": "m", "datasets": [{"path": "d"}], "factors": True, **overrides})


# ---- top_eigenbasis and the file format ---------------------------------------------------------------------------


def test_top_eigenbasis_reconstructs_a_known_low_rank_matrix():
    basis = torch.linalg.qr(torch.randn(20, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    moment = ((basis * torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64)) @ basis.T).float()
    top = top_eigenbasis(moment, energy_share=0.999, max_rank=10)
    assert top.vectors.shape == (20, 3) and top.vectors.dtype == torch.float32
    torch.testing.assert_close(top.values, torch.tensor([5.0, 3.0, 1.0]), rtol=0, atol=1e-5)
    torch.testing.assert_close((top.vectors * top.values) @ top.vectors.T, moment, rtol=0, atol=1e-5)
    assert abs(top.energy - 1.0) < 1e-5


@pytest.mark.parametrize("share, max_rank, rank, energy", [
    (0.65, 10, 2, 0.7),  # 4 + 3 of 10 is the first prefix holding 65%
    (0.75, 10, 3, 0.9),
    (0.95, 10, 4, 1.0),  # not 1.0: the two zero eigenvalues are float noise, and 100% would keep them
    (0.75, 1, 1, 0.4),  # max_rank caps below the share
])
def test_top_eigenbasis_keeps_the_fewest_vectors_holding_the_share(share, max_rank, rank, energy):
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    moment = (rotation * torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64)) @ rotation.T
    top = top_eigenbasis(moment.float(), share, max_rank)
    assert top.vectors.shape == (6, rank) and abs(top.energy - energy) < 1e-5
    assert top.trace == pytest.approx(10.0, rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the factors' moments live on the device")
def test_top_eigenbasis_of_a_moment_on_the_gpu_is_the_cpus():
    # A GPU run of `python -m fisher` with factors failed here once: the share's threshold was made on the CPU.
    moment = torch.randn(16, 16, generator=torch.Generator().manual_seed(2)).square() + torch.eye(16)
    moment = moment @ moment.T
    on_gpu, on_cpu = top_eigenbasis(moment.cuda(), 0.9, 16), top_eigenbasis(moment, 0.9, 16)
    assert on_gpu.vectors.shape == on_cpu.vectors.shape
    torch.testing.assert_close(on_gpu.values.cpu(), on_cpu.values, rtol=1e-5, atol=1e-5)


def test_top_eigenbasis_of_a_zero_moment_is_empty():
    top = top_eigenbasis(torch.zeros(5, 5), 0.9, 4)
    assert top.vectors.shape == (5, 0) and top.values.shape == (0,) and top.energy == 0.0


def write_factors(path: Path) -> Path:
    inputs, outputs = top_eigenbasis(torch.eye(4) + 0.1, 0.9, 3), top_eigenbasis(torch.eye(2) + 0.5, 0.9, 3)
    save_factors(path, {"model.layers.0.mlp.down_proj": ModuleFactors(inputs, outputs)}, {"model": "tiny"})
    return path


def rewrite(path: Path, edit_tensors=None, edit_metadata=None) -> None:
    with safe_open(path, "pt") as f:
        metadata = json.loads(f.metadata()[METADATA_KEY])
    tensors = load_file(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    save_file(tensors, path, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata)})


def test_save_and_load_factors_round_trip(tmp_path):
    path = write_factors(tmp_path / FACTORS_FILE)
    factors, metadata = load_factors(path)
    assert metadata["model"] == "tiny" and metadata["format_version"] == 1
    basis = factors["model.layers.0.mlp.down_proj"].input
    assert isinstance(basis, Eigenbasis) and basis.vectors.shape[0] == 4 and basis.trace == pytest.approx(4.4)


@pytest.mark.parametrize("edit_tensors, edit_metadata, message", [
    (None, lambda m: m.update(format_version=2), "has format_version 2; this code reads 1"),
    (None, lambda m: m.pop("traces"), "model.layers.0.mlp.down_proj.input trace missing"),
    (lambda t: t.pop("model.layers.0.mlp.down_proj.output_values"), None,
     "['model.layers.0.mlp.down_proj.output_values'] missing"),
    (lambda t: t.update({"model.layers.0.mlp.down_proj.input_vectors":
                         1.1 * t["model.layers.0.mlp.down_proj.input_vectors"]}), None,
     "model.layers.0.mlp.down_proj.input_vectors has columns that are not orthonormal"),
])
def test_load_factors_names_the_file_and_the_tensor(tmp_path, edit_tensors, edit_metadata, message):
    path = write_factors(tmp_path / FACTORS_FILE)
    rewrite(path, edit_tensors, edit_metadata)
    with pytest.raises(FactorsFileError) as error:
        load_factors(path)
    assert str(path) in str(error.value) and message in str(error.value)
