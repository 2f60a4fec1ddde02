"""The model cards (stack/card.py, heal/card.py): read back from the written README.md files and compared with
the records they describe (stack.json, protection.safetensors, train_results.json, trainer_state.json, eval.json).
Each checker returns the disagreements it finds; the negative controls feed it a tampered card and see it
report them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from core import cards as card_helpers
from core.cards import LOCAL_PATH, REPO, source_facts, strip_local_paths
from evaluation.config import EvalConfig
from evaluation.report import write_report
from evaluation.run import evaluate_models
from evaluation.stats import Interval
from heal.card import main as card_main
from heal.card import protection_report
from heal.train import main as heal_main
from stack.card import stack_card
from stack.manifest import StackManifest, load_manifest
from stack.plan import Seam

from .conftest import heal_recipe, run_stack, write_recipe
from .fisher_support import rows_for, write_jsonl

REVISION = "0123456789abcdef0123456789abcdef01234567"


# ---- reading a card back ------------------------------------------------------------------------------------------


def table(card: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table under `## heading` (header and separator rows dropped)."""
    section = card.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def tables(card: str, heading: str) -> list[list[list[str]]]:
    """Every Markdown table under `## heading`, each as rows of cells."""
    section = card.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    found, current = [], []
    for line in section.splitlines() + [""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            found.append(current[2:])
            current = []
    return found


def expand(text: str) -> list[int]:
    """'0–2, 5' -> [0, 1, 2, 5]."""
    if text == "none":
        return []
    out = []
    for part in text.split(", "):
        first, _, last = part.partition("–")
        out += list(range(int(first), int(last or first) + 1))
    return out


def stack_card_disagreements(card: str, manifest: StackManifest) -> list[str]:
    """What the card's slot, seam, attention-type and KV tables say that stack.json does not (or omit)."""
    layers: dict[int, int] = {}
    seams = []
    for slots, sources, seam in table(card, "Slots"):
        slot_list, source_list = expand(slots), expand(sources)
        if len(slot_list) != len(source_list):
            return [f"row {slots} | {sources}: {len(slot_list)} slots but {len(source_list)} source layers"]
        layers.update(zip(slot_list, source_list))
        if seam != "—":
            from_layer, to_layer = map(int, re.fullmatch(r"\w+ L(\d+) → L(\d+)", seam).groups())
            seams.append(Seam(slot_list[0], from_layer, to_layer))
    types = {slot: kind for kind, slots, _ in table(card, "Attention types") for slot in expand(slots)}
    kv_tables = tables(card, "KV sharing")
    if kv_tables:
        roles = {slot: role for role, slots, _ in kv_tables[0] for slot in expand(slots)}
    else:  # "every slot computes its own K/V"
        roles = {slot: "own" for slot in layers} if "every slot computes its own K/V" in card else {}
    grafts = {(int(s), int(j), int(d), role) for s, j, d, role in (kv_tables[1] if len(kv_tables) > 1 else [])}
    slots = manifest.slots
    expected = {
        "source layers": ({s.index: s.source_layer for s in slots}, layers),
        "seams": (list(manifest.seams), seams),
        "attention types": ({s.index: s.attention_type for s in slots}, types),
        "KV roles": ({s.index: s.kv_role for s in slots}, roles),
        "grafts": ({(s.index, s.source_layer, s.kv_graft_from, s.kv_role) for s in slots
                    if s.kv_graft_from is not None}, grafts),
    }
    return [f"{what}: stack.json {want} != card {got}" for what, (want, got) in expected.items() if want != got]


def local_paths_in(text: str, *folders: Path) -> list[str]:
    roots = {str(Path.home()), "/tmp", str(REPO)} | {str(f) for f in folders} | {str(f.resolve()) for f in folders}
    return [root for root in roots if root in text]


# ---- the raw stack's card ------------------------------------------------------------------------------------------


def test_the_e6b_card_lists_exactly_the_manifests_slots_seams_types_and_grafts(tiny_e6b):
    card = (tiny_e6b / "README.md").read_text()
    manifest = load_manifest(tiny_e6b)
    assert stack_card_disagreements(card, manifest) == []
    assert len(table(card, "Slots")) == 4 and len(tables(card, "KV sharing")[1]) == 2  # 4 runs, 2 grafted slots
    assert "Raw, do not deploy" in card


@pytest.mark.parametrize("tamper", [
    ("| 18–33 | 10–25 |", "| 18–32 | 10–24 |"),  # a dropped slot
    ("| 0–17 | 0–17 | — |", "| 0–17 | 0–17 | rewind L3 → L0 |"),  # an invented seam
    ("| full_attention | 5, 11, 17, 19,", "| full_attention | 5, 11, 17, 18,"),  # a wrong attention type
    ("| 33 | 25 | 22 | grafted |\n", ""),  # a dropped graft
])
def test_the_read_back_catches_a_card_that_disagrees_with_the_manifest(tiny_e6b, tamper):
    card = (tiny_e6b / "README.md").read_text()
    manifest = load_manifest(tiny_e6b)
    assert tamper[0] in card
    assert stack_card_disagreements(card.replace(tamper[0], tamper[1]), manifest)


def test_the_card_front_matter_parses_and_names_no_local_source(tiny_e6b, tiny_e4b):
    card = (tiny_e6b / "README.md").read_text()
    data = ModelCard(card).data.to_dict()
    assert "base_model" not in data  # a local source: no hub id to name
    assert data["base_model_relation"] == "merge" and data["pipeline_tag"] == "text-generation"
    assert {"depth-upscale", "merge", "gemma4"} <= set(data["tags"])
    assert local_paths_in(card, tiny_e4b, tiny_e6b) == []
    assert "python -m stack recipes/e6b.yaml --source <source folder> --out e6b" in card


def test_the_seed_recipe_card_corrects_the_seed_card(tiny_e6b):
    card = (tiny_e6b / "README.md").read_text()
    decoder = next(row for row in table(card, "Parameters") if row[0] == "decoder layers")[1].split(" ")[0]
    correction = card.split("## Corrections to the seed card\n\n", 1)[1].splitlines()[0]
    assert "5, 11, 17, 19, 25, 31, 39, 45, 53, 59, 65" in correction and "6.65B" in correction
    assert decoder in correction


@pytest.fixture(scope="module")
def hub_stack(tiny_llama, tmp_path_factory):
    """tiny_llama placed where the HF cache keeps google/tiny-llama at REVISION, with a card naming its license,
    stacked by a recipe that names the source by its absolute local path."""
    folder = tmp_path_factory.mktemp("hub-source")
    snapshot = folder / "models--google--tiny-llama" / "snapshots" / REVISION
    shutil.copytree(tiny_llama, snapshot)
    (snapshot / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: google/tiny-llama-base\n---\n# tiny\n")
    recipe = write_recipe(folder / "recipe.yaml", [(0, 4), (2, 6)], model=str(snapshot))
    assert run_stack(recipe, snapshot, folder / "out") == 0
    return folder / "out", snapshot


def test_a_hub_source_is_the_base_model_with_its_revision_and_license(hub_stack):
    out, snapshot = hub_stack
    card = (out / "README.md").read_text()
    data = ModelCard(card).data.to_dict()
    assert data["base_model"] == "google/tiny-llama" and data["license"] == "apache-2.0"
    assert f"at revision `{REVISION}`" in card
    assert "python -m stack recipe.yaml --source google/tiny-llama --out out" in card
    assert "Not applicable: `llama-style` has no cross-layer KV sharing" in card
    assert "Not applicable: `llama-style` has no per-layer embeddings" in card
    assert stack_card_disagreements(card, load_manifest(out)) == []


def test_a_local_path_in_the_recipe_never_reaches_the_card(hub_stack, monkeypatch):
    out, snapshot = hub_stack
    card = (out / "README.md").read_text()
    assert f"model: {LOCAL_PATH}" in card and local_paths_in(card, snapshot, out) == []
    # Negative control: without the stripping, the recipe's source path is published.
    monkeypatch.setattr(card_helpers, "strip_local_paths", lambda text: text)
    leaked = stack_card(out, source_facts(str(snapshot), snapshot), out)
    assert str(snapshot) in leaked


def test_strip_local_paths():
    home, repo = Path.home(), REPO
    text = (f"a /tmp/x/y.yaml, `{home}/models/e4b` and {repo}/out/raw|; keep /data/tmp/z, tmpfile, "
            "google/gemma-4-E4B-it and /tmpx")
    assert strip_local_paths(text) == (f"a {LOCAL_PATH}, `{LOCAL_PATH}` and {LOCAL_PATH}|; keep /data/tmp/z, "
                                       "tmpfile, google/gemma-4-E4B-it and /tmpx")


# ---- the heal's cards ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heal_run(tiny_e6b, tiny_e4b, e4b_fisher, tmp_path_factory):
    """A protected 1-step heal of the tiny E6B with merge; its cards as the heal wrote them; then an evaluation
    of its merged model against the source, beside it, and the cards rewritten by `python -m heal.card`."""
    folder = tmp_path_factory.mktemp("card-heal")
    data = folder / "data"
    data.mkdir()
    chat = write_jsonl(data / "chat.jsonl", rows_for("messages", 8))
    (data / "data.json").write_text(json.dumps({"sources": {"chat": {"package": "tiny-chat", "license": "MIT"}}}))
    recipe = heal_recipe(folder / "heal.yaml", tiny_e6b, e4b_fisher, chat, folder / "out", max_steps=1)
    assert heal_main([str(recipe)]) == 0
    out = folder / "out"
    at_heal = {"adapter": (out / "README.md").read_text(), "merged": (out / "merged" / "README.md").read_text()}
    text = write_jsonl(folder / "text.jsonl", rows_for("text", 2))
    config = EvalConfig(text=text, batch_size=2, max_length=16, bootstrap_resamples=20, device="cpu", dtype="float32")
    write_report(evaluate_models({"source": tiny_e4b, "healed": out / "merged"}, "source", config), folder / "eval")
    assert card_main([str(recipe)]) == 0
    return {"out": out, "at_heal": at_heal, "eval": json.loads((folder / "eval" / "eval.json").read_text()),
            "folders": (folder, tiny_e6b, tiny_e4b, e4b_fisher.parent)}


def heal_card_disagreements(card: str, out: Path, evaluation: dict | None) -> list[str]:
    """Where the card's training, protection and evaluation numbers differ from the heal's records."""
    results = json.loads((out / "train_results.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    training = {row[0]: row[1] for row in table(card, "Training")}
    tokens = max(entry["num_tokens"] for entry in state["log_history"] if "num_tokens" in entry)
    expected = {"train loss (mean over the run)": f"{results['train_loss']:.4f}",
                "optimizer steps": str(state["global_step"]), "tokens trained on": f"{int(tokens):,}"}
    problems = [f"{key}: card {training.get(key)} != {want}" for key, want in expected.items()
                if training.get(key) != want]
    modules = protection_report(out)["modules"]
    protected = table(card, "Protection")
    card_inputs = sum(int(row[2].split(" of ")[0].replace(",", "")) for row in protected)
    if card_inputs != sum(m["protected_inputs"] for m in modules.values()):
        problems.append(f"protected inputs: card {card_inputs}")
    if evaluation is not None:
        row = next((r for r in table(card, "Evaluation") if r[0] == "healed"), None)
        metrics = evaluation["models"]["healed"]
        names = [name for name in metrics["metrics"] if metrics["metrics"][name] is not None]
        want = [Interval(metrics["metrics"][n], *metrics["intervals"][n]).format() if n in metrics["intervals"]
                else f"{metrics['metrics'][n]:.3g} (pooled, no interval)" for n in names]
        if row is None or sorted(row[1:]) != sorted(want):
            problems.append(f"evaluation row: card {row} != {want}")
    return problems


def test_the_heal_writes_both_cards_and_no_peft_template(heal_run):
    out = heal_run["out"]
    for kind, relation in (("adapter", "adapter"), ("merged", "finetune")):
        card = heal_run["at_heal"][kind]
        data = ModelCard(card).data.to_dict()
        assert data["base_model_relation"] == relation and "base_model" not in data  # the tiny source is local
        assert {"depth-upscale", "merge", "lora", "sft", "gemma4"} <= set(data["tags"])
        assert "More Information Needed" not in card and "base_model: /" not in card
        assert "## Evaluation" not in card  # no evaluation existed yet
        assert local_paths_in(card, *heal_run["folders"]) == []
        assert heal_card_disagreements(card, out, None) == []
    assert "| seam | 36 | 4 | 8 | 17–18, 33–34, 49–50 |" in heal_run["at_heal"]["adapter"]
    assert "| graft | 4 | 2 | 4 | 32–33 | k_proj, v_proj |" in heal_run["at_heal"]["adapter"]
    assert "tiny-chat: MIT" in heal_run["at_heal"]["adapter"]


def test_the_rewritten_cards_hold_the_records_and_the_evaluation(heal_run):
    out = heal_run["out"]
    for card in ((out / "README.md").read_text(), (out / "merged" / "README.md").read_text()):
        assert heal_card_disagreements(card, out, heal_run["eval"]) == []
        assert local_paths_in(card, *heal_run["folders"]) == []
        assert "| healed − source |" in card


@pytest.mark.parametrize("tamper", [
    lambda card: re.sub(r"(\| train loss \(mean over the run\) \| )[\d.]+", r"\g<1>9.9999", card),
    lambda card: re.sub(r"(\| optimizer steps \| )\d+", r"\g<1>7", card),
    lambda card: re.sub(r"(\| seam \| \d+ of \d+ \| )[\d,]+", r"\g<1>1", card),
    lambda card: re.sub(r"(\| healed \| )[^|]+", r"\g<1>0.000 [0.000, 0.000] ", card),
])
def test_the_number_check_catches_a_card_that_disagrees_with_the_records(heal_run, tamper):
    card = (heal_run["out"] / "README.md").read_text()
    tampered = tamper(card)
    assert tampered != card
    assert heal_card_disagreements(tampered, heal_run["out"], heal_run["eval"])


def test_an_eval_that_does_not_list_the_heal_is_named(heal_run, tmp_path, caplog):
    other = json.loads(json.dumps(heal_run["eval"]))
    other["models"] = {"source": other["models"]["source"]}
    (tmp_path / "eval.json").write_text(json.dumps(other))
    recipe = yaml.safe_load((heal_run["out"].parent / "heal.yaml").read_text())
    assert card_main([str(heal_run["out"].parent / "heal.yaml"), "--eval", str(tmp_path / "eval.json")]) == 2
    assert "evaluates ['source'], none of them" in caplog.text and recipe["output_dir"] in caplog.text
