"""Helpers shared by the predictor and Cog HTTP tests: calling ``Predictor.predict`` directly, and
the reply text the service should produce for raw generated text."""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy", "no_proxy",
              "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "FTP_PROXY", "NO_PROXY")


def predict_defaults() -> dict[str, Any]:
    """Every argument of ``Predictor.predict`` with its default (the value of its ``Input(...)``)."""
    from predict import Predictor

    args: dict[str, Any] = {}
    for name, param in inspect.signature(Predictor.predict).parameters.items():
        if name == "self":
            continue
        default = param.default
        args[name] = getattr(default, "default", default)
    return args


def predict_chunks(predictor: Any, **overrides: Any) -> list[str]:
    """The chunks ``predictor.predict`` yields for the default inputs updated with ``overrides``."""
    args = predict_defaults()
    unknown = set(overrides) - set(args)
    if unknown:
        raise TypeError(f"predict() has no inputs {sorted(unknown)}")
    args.update(overrides)
    return list(predictor.predict(**args))


def predict_text(predictor: Any, **overrides: Any) -> str:
    """The whole answer of ``predictor.predict`` as one string."""
    return "".join(predict_chunks(predictor, **overrides))


def make_predictor(model_dir: Path) -> Any:
    """A ``Predictor`` set up from ``model_dir`` through $CHATGLM_WEIGHTS, as the service does."""
    from predict import Predictor

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATGLM_WEIGHTS", str(model_dir))
        mp.delenv("CHATGLM_FAMILY", raising=False)
        predictor = Predictor()
        predictor.setup()
    return predictor


def expected_reply(format_name: str, generated: str) -> str:
    """What the caller should see for the raw ``generated`` text: ChatGLM2 text without leading
    whitespace; ChatGLM3 without its metadata line, or one tool-call JSON for a non-empty one."""
    from chatglm.text.reply import ToolCallParseError, parse_tool_call

    if format_name == "chatglm2" or "\n" not in generated:
        return generated.lstrip()
    metadata, content = generated.split("\n", 1)
    if not metadata.strip():
        return content.lstrip()
    call: dict[str, Any] = {"name": metadata.strip()}
    try:
        call["arguments"] = parse_tool_call(content)
    except ToolCallParseError:
        call["content"] = content.strip()
    return json.dumps({"tool_call": call}, ensure_ascii=False)
