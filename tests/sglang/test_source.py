"""The fakes and the plugin's records against SGLang 0.5.23 itself.

The first group always runs: it pins the fakes to the signatures recorded in ``gate`` (which were
read from the 0.5.23 source). The second group reads SGLang's source files with ``ast`` and is
skipped, with its reason, where no SGLang source is present (see ``tests/sglang/source.py``).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
from typing import Any

import pytest
import torch

from producer.engines import sglang as engine_mod
from producer.sglang_plugin import gate
from services.capture import build_target_layer_ids, default_layer_ids, plan_for
from tests.sglang import fake_sglang, fakes
from tests.sglang.source import (
    ast_signature_shape,
    class_fields,
    find_class,
    find_method,
    module_tree,
    self_attributes,
    sglang_root,
)

FAKES = {
    "SchedulerBatchResultProcessor": fakes.SchedulerBatchResultProcessor,
    "SchedulerOutputStreamer": fakes.SchedulerOutputStreamer,
}
# The parameter list of sglang.Engine.generate in 0.5.23, recorded from its source.
ENGINE_GENERATE = (
    "(self, prompt=None, sampling_params=None, input_ids=None, image_data=None, "
    "audio_data=None, video_data=None, mm_hashes=None, mm_content_hashes=None, "
    "return_logprob=False, logprob_start_len=None, top_logprobs_num=None, "
    "token_ids_logprob=None, lora_path=None, custom_logit_processor=None, "
    "require_reasoning=False, return_hidden_states=False, return_routed_experts=False, "
    "routed_experts_start_len=0, stream=False, bootstrap_host=None, bootstrap_port=None, "
    "bootstrap_room=None, routed_dp_rank=None, disagg_prefill_dp_rank=None, kv_hints=None, "
    "data_parallel_rank=None, external_trace_header=None, rid=None, session_params=None, "
    "priority=None, session_id=None, *, cache_salt=None)"
)

ROOT = sglang_root()
if ROOT is None and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    raise RuntimeError("SGLang source missing in CI: scripts/setup.sh --test unpacks it into "
                       ".cache/sglang-src")
needs_source = pytest.mark.skipif(
    ROOT is None,
    reason="SGLang source not found: set DRAFTFLOW_SGLANG_SRC to an unpacked sglang wheel "
    "(pip download --no-deps sglang==0.5.23; unzip)",
)


@pytest.mark.parametrize("hooked", gate.HOOKED_METHODS, ids=lambda h: f"{h.cls}.{h.method}")
def test_fakes_have_the_recorded_signatures(hooked: gate.HookedMethod) -> None:
    fn = FAKES[hooked.cls].__dict__[hooked.method]
    assert gate.signature_shape(fn) == hooked.signature


def test_fake_engine_generate_has_the_recorded_signature() -> None:
    assert gate.signature_shape(fake_sglang.Engine.generate) == ENGINE_GENERATE


def test_the_plugin_passes_its_own_gate_on_the_fakes() -> None:
    for hooked in gate.HOOKED_METHODS:
        gate.check_method(FAKES[hooked.cls], hooked)


@needs_source
def test_sglang_source_is_the_version_the_records_were_made_from() -> None:
    assert ROOT is not None
    text = (ROOT / "sglang" / "_version.py").read_text()
    assert "__version__ = version = '0.5.23'" in text


@needs_source
@pytest.mark.parametrize("hooked", gate.HOOKED_METHODS, ids=lambda h: f"{h.cls}.{h.method}")
def test_recorded_signatures_match_sglang_source(hooked: gate.HookedMethod) -> None:
    assert ROOT is not None
    cls = find_class(module_tree(ROOT, hooked.module), hooked.cls)
    assert ast_signature_shape(find_method(cls, hooked.method)) == hooked.signature


@needs_source
@pytest.mark.parametrize("name", sorted(FAKES))
def test_fake_dataclass_fields_match_sglang_source(name: str) -> None:
    assert ROOT is not None
    module = {
        "SchedulerBatchResultProcessor": gate.PROCESSOR_MODULE,
        "SchedulerOutputStreamer": gate.STREAMER_MODULE,
    }[name]
    real = class_fields(find_class(module_tree(ROOT, module), name))
    fake = [f.name for f in dataclasses.fields(FAKES[name])]
    # ClassVar annotations are class-level names too, but not dataclass fields.
    assert [f for f in real if f != "has_additional_customized_info"] == fake
    assert dataclasses.is_dataclass(FAKES[name])


@needs_source
def test_fake_logits_output_fields_exist_in_sglang_source() -> None:
    assert ROOT is not None
    tree = module_tree(ROOT, "sglang.srt.layers.logits_processor")
    real = class_fields(find_class(tree, "LogitsProcessorOutput"))
    assert set(f.name for f in dataclasses.fields(fakes.LogitsProcessorOutput)) <= set(real)


@needs_source
def test_fake_req_attributes_exist_in_sglang_source() -> None:
    assert ROOT is not None
    cls = find_class(module_tree(ROOT, "sglang.srt.managers.schedule_batch"), "Req")
    real = self_attributes(find_method(cls, "__init__"))  # type: ignore[arg-type]
    fake = self_attributes_of(fakes.Req)
    assert fake <= real, sorted(fake - real)
    real_params = set(inspect.signature(fakes.Req.__init__).parameters) - {"self"}
    init = find_method(cls, "__init__")
    assert real_params <= {a.arg for a in init.args.args + init.args.kwonlyargs}


@needs_source
def test_the_request_channel_fields_exist_in_sglang_source() -> None:
    assert ROOT is not None
    params = class_fields(
        find_class(module_tree(ROOT, "sglang.srt.sampling.sampling_params"), "SamplingParams")
    )
    assert {"custom_params", "max_new_tokens", "temperature", "ignore_eos"} <= set(params)
    request = class_fields(
        find_class(module_tree(ROOT, "sglang.srt.managers.io_struct"), "GenerateReqInput")
    )
    body = engine_mod.request_payload(engine_mod.CaptureItem("r", "s", 0, (1, 2)), store_id="st")
    assert set(body) <= set(request)


@needs_source
def test_the_server_flags_checked_exist_in_sglang_source() -> None:
    assert ROOT is not None
    fields: set[str] = set()
    for path in (ROOT / "sglang/srt/arg_groups/fields").glob("*.py"):
        module = "sglang.srt.arg_groups.fields." + path.stem
        for node in module_tree(ROOT, module).body:
            if hasattr(node, "body"):
                fields.update(class_fields(node))  # type: ignore[arg-type]
    info = fakes.capture_server_args([1, 2, 3])
    checked = set(info) - {"version"}
    assert checked <= fields, sorted(checked - fields)
    kwargs = engine_mod.capture_engine_kwargs(
        engine_mod.EngineConfig(model_path="/m"), [1, 2, 3], {}
    )
    assert set(kwargs) <= fields, sorted(set(kwargs) - fields)


@needs_source
def test_fake_engine_generate_matches_sglang_source() -> None:
    assert ROOT is not None
    cls = find_class(module_tree(ROOT, "sglang.srt.entrypoints.engine"), "Engine")
    assert ast_signature_shape(find_method(cls, "generate")) == ENGINE_GENERATE
    assert ast_signature_shape(find_method(cls, "get_server_info")) == "(self)"
    assert ast_signature_shape(find_method(cls, "shutdown")) == "(self)"


def self_attributes_of(cls: type) -> set[str]:
    import textwrap

    source = textwrap.dedent(inspect.getsource(cls.__init__))
    fn = ast.parse(source).body[0]
    assert isinstance(fn, ast.FunctionDef)
    return self_attributes(fn)


# -- the DFlash capture path: how SGLang 0.5.23 turns the run's layer ids into captured rows ----
#
# --speculative-algorithm DFLASH --enable-return-aux-hidden-states resolves to
# aux_hidden_state_capture="dflash"; the model runner hands --return-aux-hidden-state-layer-ids
# unchanged to the model's set_dflash_layers_to_capture, which captures before layer id + 1 (the
# output of layer id, HF's hidden_states[id + 1]); the model's forward captures in layer order and
# the logits processor concatenates the captures in that order. So DraftFlow's plan ids (id i =
# output of layer i, ascending) name exactly the blocks of the captured [L, K*H] rows, in order.

# (module, model class, decoder-stack class) of the targets DraftFlow ships examples for.
CAPTURE_MODELS = [
    ("sglang.srt.models.llama", "LlamaForCausalLM", "LlamaModel"),
    ("sglang.srt.models.qwen3", "Qwen3ForCausalLM", "Qwen3Model"),
]
MODEL_IDS = ["llama", "qwen3"]


def _statements(fn: ast.AST) -> list[str]:
    return [ast.unparse(node) for node in ast.walk(fn) if isinstance(node, ast.stmt)]


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise LookupError(f"function {name} not found")


def _layers_assignment(method: ast.FunctionDef) -> ast.expr:
    """The value of the (last) ``self.model.layers_to_capture = ...`` in ``method``."""
    values = [
        node.value
        for node in ast.walk(method)
        if isinstance(node, ast.Assign)
        and [ast.unparse(t) for t in node.targets] == ["self.model.layers_to_capture"]
    ]
    assert values, f"{method.name} assigns no self.model.layers_to_capture"
    return values[-1]


@needs_source
def test_dflash_is_a_capture_convention_that_resolves_to_dflash() -> None:
    assert ROOT is not None
    tree = module_tree(ROOT, "sglang.srt.arg_groups.validation_hook")
    methods = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [ast.unparse(t) for t in node.targets] == ["_AUX_HIDDEN_STATE_CAPTURE_METHODS"]
    )
    kwargs = engine_mod.capture_engine_kwargs(
        engine_mod.EngineConfig(model_path="/m", algorithm="dflash"), [1, 2, 3], {}
    )
    assert kwargs["speculative_algorithm"] == "DFLASH" and "DFLASH" in methods
    # The resolved convention is the lower-cased algorithm: what server_problems and the
    # plugin compare with.
    handle = _function(tree, "handle_aux_hidden_state_capture")
    assert any("aux_hidden_state_capture=method.lower()" in s for s in _statements(handle))
    for algorithm in ("dflash", "domino"):
        plan = plan_for(algorithm, [0, 2, 5], 8)
        assert engine_mod.sglang_capture(plan) == "dflash"
    assert engine_mod.sglang_capture(plan_for("eagle3", [1, 3, 4], 8)) == "eagle3"
    # Without layer ids DFLASH refuses to start: the engine always passes the plan's.
    assert any("method != 'EAGLE3' and (not layer_ids)" in s for s in _statements(handle))
    assert kwargs["return_aux_hidden_state_layer_ids"] == [1, 2, 3]


@needs_source
def test_capture_only_dflash_hands_the_layer_ids_to_the_model_unchanged() -> None:
    assert ROOT is not None
    tree = module_tree(
        ROOT, "sglang.srt.model_executor.model_runner_components.spec_aux_hidden_state"
    )
    body = _statements(_function(tree, "_resolve_capture_only_aux_hidden_state"))
    assert "layer_ids = features.return_aux_hidden_state_layer_ids" in body
    assert "config.dflash_target_layer_ids = list(layer_ids)" in body
    setup = module_tree(
        ROOT, "sglang.srt.model_executor.model_runner_components.attention_backend_setup"
    )
    calls = _statements(_function(setup, "configure_aux_hidden_state_capture"))
    assert "model.set_dflash_layers_to_capture(dflash_target_layer_ids)" in calls


@needs_source
@pytest.mark.parametrize(("module", "model", "stack"), CAPTURE_MODELS, ids=MODEL_IDS)
def test_layer_id_i_is_captured_before_layer_i_plus_1(module: str, model: str, stack: str) -> None:
    """set_dflash_layers_to_capture (and set_eagle3_layers_to_capture with ids) capture before
    layer id + 1: the output of layer id. The fake's mapping is SGLang's, evaluated."""
    assert ROOT is not None
    cls = find_class(module_tree(ROOT, module), model)
    for name in ("set_dflash_layers_to_capture", "set_eagle3_layers_to_capture"):
        method = find_method(cls, name)
        assert isinstance(method, ast.FunctionDef)
        value = _layers_assignment(method)
        assert isinstance(value, ast.ListComp), ast.unparse(value)
        code = compile(ast.Expression(value), f"{module}.{model}.{name}", "eval")
        for ids in ([0, 2, 5], [4], [1, 3, 4], [0, 6]):
            got = eval(code, {"layer_ids": ids})
            assert got == [i + 1 for i in ids] == fakes.layers_to_capture(ids, 8, "dflash")


@needs_source
@pytest.mark.parametrize(("module", "model", "stack"), CAPTURE_MODELS, ids=MODEL_IDS)
def test_eagle3_default_layers_are_the_plans_default(module: str, model: str, stack: str) -> None:
    assert ROOT is not None
    cls = find_class(module_tree(ROOT, module), model)
    method = find_method(cls, "set_eagle3_layers_to_capture")
    assert isinstance(method, ast.FunctionDef)
    defaults = [
        node.value
        for node in ast.walk(method)
        if isinstance(node, ast.Assign)
        and [ast.unparse(t) for t in node.targets] == ["self.model.layers_to_capture"]
        and isinstance(node.value, ast.List)
    ]
    [default] = defaults
    for n in (8, 32, 36):
        got = eval(compile(ast.Expression(default), "default", "eval"), {"num_layers": n})
        assert got == [i + 1 for i in default_layer_ids("eagle3", n)]
        assert got == fakes.layers_to_capture(None, n, "eagle3")


@needs_source
@pytest.mark.parametrize(("module", "model", "stack"), CAPTURE_MODELS, ids=MODEL_IDS)
def test_captures_follow_layer_order_and_are_layer_inputs(
    module: str, model: str, stack: str
) -> None:
    """The decoder stack captures in its own layer loop, by membership: rows come out in
    ascending layer order whatever the order of the ids (which is why plans must ascend), and
    what is captured is a layer's input, the output of the layer before."""
    assert ROOT is not None
    tree = module_tree(ROOT, module)
    forward = find_method(find_class(tree, stack), "forward")
    loops = [
        node
        for node in ast.walk(forward)
        if isinstance(node, ast.For)
        and ast.unparse(node.iter) == "range(self.start_layer, self.end_layer)"
    ]
    [loop] = loops
    captures = [
        ast.unparse(kw.value)
        for node in ast.walk(loop)
        if isinstance(node, ast.Call)
        for kw in node.keywords
        if kw.arg == "capture_output"
    ]
    assert captures == ["aux_hidden_states.capture if i in self.layers_to_capture else None"]
    # The decoder layer hands capture_output to its first step, before attention reads the
    # residual stream: the capture is the layer's input.
    layer_cls = {"LlamaModel": "LlamaDecoderLayer", "Qwen3Model": "Qwen3DecoderLayer"}[stack]
    layer_forward = find_method(find_class(tree, layer_cls), "forward")
    first = next(s for s in layer_forward.body if not isinstance(s, ast.Expr))
    text = ast.unparse(first)
    assert text.startswith("hidden_states = self.attn_boundary.prepare(hidden_states"), text
    assert "capture=capture_output" in text
    # The fake captures the same way: ascending whatever the order of its capture points.
    outs = [torch.full((2, 1), float(j)) for j in range(9)]
    got = fakes.captured_layers(outs, [6, 1, 3], 8)
    assert got[0].tolist() == [1.0, 3.0, 6.0]


@needs_source
def test_captures_are_concatenated_in_capture_order() -> None:
    assert ROOT is not None
    tree = module_tree(ROOT, "sglang.srt.layers.aux_hidden_states")
    body = _statements(_function(tree, "pack_aux_hidden_states"))
    assert "return torch.cat(aux_hidden_states, dim=-1)" in body
    assert "return aux_hidden_states[0]" in body  # one layer: [L, H] as it is


@needs_source
def test_sglang_keeps_the_final_state_in_every_capture_mode() -> None:
    """The post-norm rows stay on the GPU in DFLASH mode too; the plugin simply never reads them
    for a DFlash plan (no copy, no write)."""
    assert ROOT is not None
    cls = find_class(module_tree(ROOT, "sglang.srt.layers.logits_processor"), "LogitsProcessor")
    body = _statements(find_method(cls, "__init__"))
    assert "self.keep_last_hidden_states = features.aux_hidden_state_capture is not None" in body


@needs_source
def test_dflash_default_layers_match_sglang() -> None:
    """services.capture.build_target_layer_ids is SGLang's build_target_layer_ids."""
    assert ROOT is not None
    tree = module_tree(ROOT, "sglang.srt.speculative.dflash_utils")
    fn = _function(tree, "build_target_layer_ids")
    namespace: dict[str, Any] = {"List": list}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "dflash_utils", "exec"), namespace)
    for n in range(4, 81):
        for d in range(1, 9):
            assert build_target_layer_ids(n, d) == namespace["build_target_layer_ids"](n, d)
