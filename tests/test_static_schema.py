"""predict.py stays readable by today's ``cog build``, which writes the input schema by reading the
file as text: every ``Input(...)`` argument must be a literal (a name such as ``le=MAX_SEED`` is
silently dropped), each description one plain string literal (the CLI takes the text between the
quotes raw, so concatenated literals keep their inner quotes and escapes stay backslashes), and an
input that may be absent is ``Optional[...]``."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PREDICT = ROOT / "predict.py"


def _predict_function(tree: ast.Module) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Predictor":
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == "predict":
                    return item
    raise AssertionError("predict.py has no Predictor.predict")


def static_inputs(source: str) -> dict[str, dict[str, Any]]:
    """Each input's literal ``Input(...)`` arguments (and its annotation's source), as a text-reading
    schema writer sees them; AssertionError naming the input and argument for anything else."""
    tree = ast.parse(source)
    func = _predict_function(tree)
    params = func.args.args[1:]
    defaults = func.args.defaults
    assert len(defaults) == len(params), "every predict() input needs an Input(...) default"
    inputs: dict[str, dict[str, Any]] = {}
    for param, default in zip(params, defaults):
        name = param.arg
        assert isinstance(default, ast.Call) and getattr(default.func, "id", None) == "Input", \
            f"{name}: the default must be Input(...)"
        assert not default.args, f"{name}: Input() takes keyword arguments only here"
        args: dict[str, Any] = {}
        for kw in default.keywords:
            where = f"{name}: Input({kw.arg}=...)"
            assert isinstance(kw.value, ast.Constant), \
                f"{where} is not a literal ({ast.get_source_segment(source, kw.value)}); write the value itself"
            value = kw.value.value
            if isinstance(value, str):
                segment = ast.get_source_segment(source, kw.value)
                assert segment[0] == segment[-1] and segment[0] in "'\"" and segment[1:-1] == value \
                    and not segment.startswith(('"""', "'''")), \
                    f"{where}: not one plain string literal (concatenated, or with escapes): {segment[:60]}..."
            args[kw.arg] = value
        args["annotation"] = ast.get_source_segment(source, param.annotation)
        inputs[name] = args
    return inputs


def check_inputs(source: str) -> dict[str, dict[str, Any]]:
    """:func:`static_inputs`, plus: every input has a description, and one without a default value
    is ``Optional[...]``."""
    inputs = static_inputs(source)
    for name, args in inputs.items():
        assert isinstance(args.get("description"), str) and args["description"], f"{name}: no description"
        if args.get("default") is None:
            assert args["annotation"].startswith("Optional["), f"{name}: may be absent, so it must be Optional[...]"
    return inputs


def test_every_input_argument_is_a_literal() -> None:
    assert check_inputs(PREDICT.read_text(encoding="utf-8")), "no inputs found"


@pytest.mark.parametrize("source,words", [
    ('seed: int = Input(description="s", default=0, le=MAX_SEED)', "seed: Input(le=...) is not a literal (MAX_SEED)"),
    ('seed: int = Input(description="s", default=0, le=2**32 - 1)', "seed: Input(le=...) is not a literal"),
    ('prompt: str = Input(default="", description="a " "b")', "prompt: Input(description=...): not one plain"),
    ('prompt: str = Input(default="", description="a\\nb")', "prompt: Input(description=...): not one plain"),
    ('seed: int = Input(description="s", default=None)', "seed: may be absent, so it must be Optional"),
    ('seed: int = Input(default=1)', "seed: no description"),
    ('prompt: str = "x"', "prompt: the default must be Input(...)"),
], ids=["name", "expression", "concatenated", "escape", "not-optional", "no-description", "no-input"])
def test_the_check_catches_what_the_cli_would_drop(source: str, words: str) -> None:
    text = f"class Predictor:\n    def predict(self, {source}):\n        pass\n"
    with pytest.raises(AssertionError, match=re.escape(words)):
        check_inputs(text)


def test_literal_bounds_are_the_engines_bounds() -> None:
    """The numbers written out in predict.py are the ones the package enforces."""
    from chatglm.serving.pipeline import MAX_SEED
    from chatglm.text.stops import MAX_STOP_CHARS, MAX_STOP_SEQUENCES

    inputs = static_inputs(PREDICT.read_text(encoding="utf-8"))
    assert inputs["seed"]["le"] == MAX_SEED and inputs["seed"]["ge"] == 0
    from chatglm.serving.sampling import MAX_MIN_TOKENS, PENALTY_BOUND
    for name in ("presence_penalty", "frequency_penalty"):
        # The service takes the non-negative half of the engine's range: a negative literal is an
        # operator expression to a text reader of this file, and a dropped bound is no bound.
        assert (inputs[name]["ge"], inputs[name]["le"]) == (0.0, PENALTY_BOUND)
    assert inputs["min_tokens"]["le"] == MAX_MIN_TOKENS == inputs["max_tokens"]["le"]
    assert f"at most {MAX_STOP_SEQUENCES}, each at most {MAX_STOP_CHARS} characters" in \
        inputs["stop_sequences"]["description"]


def test_static_inputs_match_the_runtime_schema() -> None:
    """What a text reader of predict.py sees equals the schema cog 0.16.12 builds by importing it
    (the one tests/cogserver.py hands coglet as .cog/openapi_schema.json)."""
    from tests.cogserver import build_schema

    props = build_schema()["components"]["schemas"]["Input"]["properties"]
    inputs = static_inputs(PREDICT.read_text(encoding="utf-8"))
    assert set(props) == set(inputs)
    for name, args in inputs.items():
        assert props[name].get("description") == args["description"], name
        assert props[name].get("default") == args.get("default"), name
        assert props[name].get("minimum") == args.get("ge"), name
        assert props[name].get("maximum") == args.get("le"), name

