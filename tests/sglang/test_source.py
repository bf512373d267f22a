"""The fakes and the plugin's records against SGLang 0.5.23 itself.

The first group always runs: it pins the fakes to the signatures recorded in ``gate`` (which were
read from the 0.5.23 source). The second group reads SGLang's source files with ``ast`` and is
skipped, with its reason, where no SGLang source is present (see ``tests/sglang/source.py``).
"""

from __future__ import annotations

import dataclasses
import inspect
import os

import pytest

from producer.engines import sglang as engine_mod
from producer.sglang_plugin import gate
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
    import ast
    import textwrap

    source = textwrap.dedent(inspect.getsource(cls.__init__))
    fn = ast.parse(source).body[0]
    assert isinstance(fn, ast.FunctionDef)
    return self_attributes(fn)
