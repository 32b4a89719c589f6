"""Which chat model a directory holds: ChatGLM2, ChatGLM3 or ChatGLM3-32K.

The official config.json files are nearly identical, so detection reads, in order: an explicit
override; ``_name_or_path`` in config.json; ``name_or_path`` in tokenizer_config.json; the text of
``tokenization_chatglm.py`` when present (read as text, never executed: only ChatGLM3's declares the
``<|observation|>`` role token).
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import ChatGLMConfig

FAMILIES = ("chatglm2", "chatglm3", "chatglm3-32k")


def prompt_format(family: str) -> str:
    """The chat format a family uses: ``chatglm2`` or ``chatglm3``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(FAMILIES)}")
    return "chatglm3" if family.startswith("chatglm3") else "chatglm2"


def _from_name(name: str, config: ChatGLMConfig) -> str | None:
    name = name.lower()
    if "chatglm3" in name:
        return "chatglm3-32k" if ("32k" in name or config.rope_ratio > 1) else "chatglm3"
    if "chatglm2" in name:
        return "chatglm2"
    return None


def detect_family(model_dir: str | Path, config: ChatGLMConfig, override: str | None = None) -> str:
    """Return one of ``FAMILIES`` for ``model_dir``; ``override`` wins when given."""
    if override:
        prompt_format(override)
        return override
    model_dir = Path(model_dir)
    found = _from_name(config.name_or_path, config)
    if found:
        return found
    tok_cfg = model_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        try:
            name = str(json.loads(tok_cfg.read_text(encoding="utf-8")).get("name_or_path", ""))
        except (json.JSONDecodeError, AttributeError):
            name = ""
        found = _from_name(name, config)
        if found:
            return found
    tok_code = model_dir / "tokenization_chatglm.py"
    if tok_code.is_file():
        text = tok_code.read_text(encoding="utf-8", errors="replace")
        base = "chatglm3" if "<|observation|>" in text else "chatglm2"
        return _from_name(base, config) or base
    raise ValueError(
        f"{model_dir}: cannot tell whether this is a ChatGLM2 or ChatGLM3 model (config.json "
        f"_name_or_path={config.name_or_path!r}, no recognisable tokenizer_config.json or "
        "tokenization_chatglm.py). Pass the family explicitly: family='chatglm2', 'chatglm3' or "
        "'chatglm3-32k' (environment variable CHATGLM_FAMILY for the service).")
