"""Every file a user brings as a LoRA adapter is checked when it is opened (issue 25, section 3).

Hypothesis writes safetensors files (raw header bytes, so any dtype, shape, metadata or damage can be said) in the
three formats ovsd3 reads (diffusers, kohya, PEFT folders), each broken in one way, and every one must end in an
``InvalidRequest`` of one line naming the file (and the tensor or field where there is one), the pipeline's
adapters left as they were. Valid generated adapters must load and give the deltas the formula gives, so that
the checks cannot pass by refusing everything. The command line: exit 2 and one line from ``run`` and ``serve``.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovsd3.errors import InvalidRequest
from ovsd3.runtime import SD3Pipeline
from ovsd3.runtime.adapters import LoraAdapter, adapter_deltas, read_adapter

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CODES = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}
TEXT = st.characters(blacklist_categories=("Cs",))  # text that a JSON header and a file can hold
BAD_DTYPES = ("F8_E4M3", "F8_E5M2", "I8", "I16", "I32", "I64", "U8", "U16", "BOOL")


def encoded(values, dtype: str = "F32") -> tuple[str, list, bytes]:
    """A tensor as a safetensors header entry needs it: (dtype, shape, little-endian bytes)."""
    values = np.asarray(values, dtype=np.float32 if dtype == "BF16" else CODES.get(dtype, "<f4"))
    if dtype == "BF16":
        raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    else:
        raw = values.tobytes()
    return dtype, list(values.shape), raw


def as_read(values, dtype: str) -> np.ndarray:
    """What a reader of ``encoded(values, dtype)`` must get back, as float32."""
    values = np.asarray(values, dtype=np.float32)
    if dtype == "BF16":
        return ((values.view(np.uint32) >> 16) << 16).view(np.float32)
    return values.astype(CODES[dtype]).astype(np.float32)


def write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """A safetensors file written byte by byte (values: arrays, or ``encoded`` triples for any dtype)."""
    header, data = {}, b""
    for name, value in tensors.items():
        dtype, shape, raw = value if isinstance(value, tuple) else encoded(value)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.fixture(scope="module")
def pipe(ov_sd3):
    return SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None)


@pytest.fixture(scope="module")
def shapes(ov_sd3) -> dict[str, tuple]:
    import openvino as ov

    from ovsd3 import layout
    from ovsd3.ir.lora import layer_shapes

    return layer_shapes(ov.Core().read_model(layout.model_xml(ov_sd3, layout.TRANSFORMER)))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora-files")


def fresh(files: Path) -> Path:
    """A new file name for one generated case (hypothesis may draw the same case twice)."""
    return Path(tempfile.mkdtemp(dir=files)) / "lora.safetensors"


def assert_refused(pipe, adapter, *needles) -> str:
    """set_adapters(adapter) refuses with one line naming the file and ``needles``; the adapters stay as they
    were."""
    before = pipe.adapters
    with pytest.raises(InvalidRequest) as caught:
        pipe.set_adapters(adapter)
    message = str(caught.value)
    assert "\n" not in message, message
    assert str(adapter.path if isinstance(adapter, LoraAdapter) else adapter) in message, message
    for needle in needles:
        assert str(needle) in message, message
    assert pipe.adapters == before
    return message


def linear(shapes) -> st.SearchStrategy:
    return st.sampled_from(sorted(name for name, shape in shapes.items() if len(shape) == 2))


def factor(rng, *shape) -> np.ndarray:
    return rng.normal(0, 0.1, shape).astype(np.float32)


# -- diffusers files ------------------------------------------------------------------------------------------

SHAPE_BREAKS = ("rank", "in", "out", "a_1d", "b_1d", "a_3d", "b_3d", "rank0", "empty_in", "layer", "block",
                "one_factor", "unknown_key")


def broken_shapes(draw, shapes, rng) -> tuple[dict, tuple]:
    """A diffusers state dict with one layer broken in one way, and what the error must name."""
    module = draw(linear(shapes))
    out, inp = shapes[module]
    rank, extra = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    a_key, b_key = f"transformer.{module}.lora_A.weight", f"transformer.{module}.lora_B.weight"
    A, B = factor(rng, rank, inp), factor(rng, out, rank)
    kind = draw(st.sampled_from(SHAPE_BREAKS))
    if kind == "rank":
        B = factor(rng, out, rank + extra)
    elif kind == "in":
        A = factor(rng, rank, draw(st.integers(1, 3 * inp).filter(lambda n: n != inp)))
    elif kind == "out":
        B = factor(rng, draw(st.integers(1, 3 * out).filter(lambda n: n != out)), rank)
    elif kind in ("a_1d", "b_1d"):
        A, B = (A[0], B) if kind == "a_1d" else (A, B[:, 0])
    elif kind in ("a_3d", "b_3d"):
        A, B = (A[..., None], B) if kind == "a_3d" else (A, B[..., None])
    elif kind == "rank0":
        A, B = np.zeros((0, inp), np.float32), np.zeros((out, 0), np.float32)
    elif kind == "empty_in":
        A = np.zeros((rank, 0), np.float32)
    elif kind in ("layer", "block"):
        block = draw(st.integers(2, 10**6))  # the tiny transformer has blocks 0 and 1
        module = "not_a_layer.proj" if kind == "layer" else f"transformer_blocks.{block}.attn.to_q"
        a_key, b_key = f"transformer.{module}.lora_A.weight", f"transformer.{module}.lora_B.weight"
    tensors = {a_key: A, b_key: B}
    if kind == "one_factor":
        del tensors[b_key]
    if kind == "unknown_key":
        tensors[f"transformer.{module}.alpha"] = np.ones((), np.float32)
        return tensors, (f"transformer.{module}.alpha",)
    needles = {"rank": (b_key,), "b_1d": (b_key,), "b_3d": (b_key,), "layer": (module,), "block": (module,),
               "one_factor": (module,), "in": (module,), "out": (module,)}
    return tensors, needles.get(kind, (a_key,))


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_diffusers_files_with_broken_shapes_are_refused(pipe, shapes, files, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    tensors, needles = broken_shapes(data.draw, shapes, rng)
    path = write(fresh(files), tensors)
    assert_refused(pipe, path, *needles)


def valid_pair(shapes, module: str, rng, rank: int = 2) -> dict:
    out, inp = shapes[module]
    return {f"transformer.{module}.lora_A.weight": factor(rng, rank, inp),
            f"transformer.{module}.lora_B.weight": factor(rng, out, rank)}


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_unreadable_values_and_dtypes_are_refused(pipe, shapes, files, data):
    """NaN and infinity (black images), numbers past float32, and dtypes ovsd3 does not read (F8, integers,
    booleans): the tensor and, for a dtype, the dtype named."""
    module = data.draw(linear(shapes))
    tensors = valid_pair(shapes, module, np.random.default_rng(0), rank=data.draw(st.integers(1, 4)))
    key = data.draw(st.sampled_from(sorted(tensors)))
    kind = data.draw(st.sampled_from(("value", "dtype")))
    if kind == "value":
        bad = data.draw(st.sampled_from((math.nan, math.inf, -math.inf, 1e39, -1e300)))
        values = tensors[key].astype(np.float64)  # F64: a finite value beyond float32 can be stored
        values.reshape(-1)[data.draw(st.integers(0, values.size - 1))] = bad
        tensors[key] = encoded(values, data.draw(st.sampled_from(("F64", "F32"))) if not math.isfinite(bad) else "F64")
        needles = (key, "NaN or infinite")
    else:
        dtype = data.draw(st.sampled_from(BAD_DTYPES))
        size = {"I16": 2, "U16": 2, "I32": 4, "I64": 8}.get(dtype, 1)
        tensors[key] = (dtype, list(tensors[key].shape), bytes(tensors[key].size * size))
        needles = (key, dtype)
    assert_refused(pipe, write(fresh(files), tensors), *needles)


def metadata_breaks() -> st.SearchStrategy:
    """(lora_adapter_metadata text, the field the error names or None)."""
    not_json = st.text(TEXT, min_size=1, max_size=40).filter(lambda text: not _parses(text)).map(lambda t: (t, None))
    not_object = st.sampled_from(("[1, 2]", "5", '"alpha"', "null", "true", "[" * 100_000)).map(lambda t: (t, None))
    field_values = {
        "lora_alpha": ("8", True, [8], {"a": 1}, "NaN", "Infinity", "-Infinity", "1e400"),
        "r": (0, -1, "2", 2.5, True, [2], 3),
        "use_rslora": ("yes", 1, [True]),
        "use_dora": ("no", 0, True),
        "peft_type": (7, "LOHA", "LOKR"),
        "alpha_pattern": ([1], "x", {"(": 4.0}, {"[a-": 4.0}, {"to_q": "big"}, {"to_q": "NaN"}, {"*a": 1.0}),
        "rank_pattern": ({")": 2}, {"to_q": 0}, {"to_q": "2"}, 7),
    }
    field = st.sampled_from(sorted(field_values)).flatmap(
        lambda name: st.sampled_from(field_values[name]).map(lambda value: (name, value)))
    return st.one_of(not_json, not_object, field.map(lambda pair: (_metadata_text(*pair), pair[0])))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def _metadata_text(field: str, value) -> str:
    saved = {"transformer.r": 2, "transformer.lora_alpha": 4.0, f"transformer.{field}": value}
    text = json.dumps(saved)
    for literal in ("NaN", "Infinity", "-Infinity", "1e400"):  # JSON's non-finite literals, as Python writes them
        text = text.replace(f'"{literal}"', literal) if value == literal else text
    return text


@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), broken=metadata_breaks())
def test_diffusers_metadata_that_is_not_a_lora_config_is_refused(pipe, shapes, files, data, broken):
    text, field = broken
    tensors = valid_pair(shapes, "transformer_blocks.0.attn.to_q", np.random.default_rng(1))
    path = write(fresh(files), tensors,
                 metadata={"format": "pt", "lora_adapter_metadata": text})
    assert_refused(pipe, path, "lora_adapter_metadata", *(() if field is None else (field,)))


@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_files_that_are_not_safetensors_are_refused(pipe, shapes, files, data):
    path = fresh(files)
    whole = write(path, valid_pair(shapes, "transformer_blocks.0.attn.to_q", np.random.default_rng(2))).read_bytes()
    kind = data.draw(st.sampled_from(("empty", "bytes", "truncated", "huge_header")))
    content = {"empty": b"", "bytes": data.draw(st.binary(max_size=64)),
               "truncated": whole[:data.draw(st.integers(1, len(whole) - 1))],
               "huge_header": struct.pack("<Q", data.draw(st.integers(len(whole), 2**63))) + whole[8:]}[kind]
    path.write_bytes(content)
    assert_refused(pipe, path, "cannot read LoRA")


# -- kohya files and PEFT folders -----------------------------------------------------------------------------

def kohya_breaks(draw, rng) -> tuple[dict, tuple]:
    rank = draw(st.integers(1, 4))
    name = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    down, up, alpha = factor(rng, rank, 32), factor(rng, 96, rank), np.array(float(rank), np.float32)
    kind = draw(st.sampled_from(("qkv_rows", "rank0", "alpha_shape", "alpha_nan", "orphan_alpha", "unknown",
                                 "only_down")))
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": alpha}
    if kind == "qkv_rows":
        tensors[f"{name}.lora_up.weight"] = factor(rng, draw(st.integers(1, 200).filter(lambda n: n % 3)), rank)
        return tensors, (f"{name}.lora_up.weight", "3 equal parts")
    if kind == "rank0":
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = np.zeros((0, 32)), np.zeros((96, 0))
        return tensors, (f"{name}.lora_down.weight",)
    if kind == "alpha_shape":
        tensors[f"{name}.alpha"] = np.ones(draw(st.sampled_from(((2,), (0,), (2, 2)))), np.float32)
        return tensors, (f"{name}.alpha",)
    if kind == "alpha_nan":
        tensors[f"{name}.alpha"] = np.array(draw(st.sampled_from((math.nan, math.inf))), np.float32)
        return tensors, (f"{name}.alpha", "NaN or infinite")
    if kind == "orphan_alpha":
        tensors["lora_unet_context_embedder.alpha"] = alpha
        return tensors, ("lora_unet_context_embedder.alpha",)
    if kind == "unknown":
        renamed = "lora_unet_joint_blocks_0_x_block_attn_rope"
        tensors = {key.replace(name, renamed): value for key, value in tensors.items()}
        return tensors, (renamed,)
    del tensors[f"{name}.lora_up.weight"]
    return tensors, ("joint_blocks_0_x_block_attn_qkv",)


@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_kohya_files_with_broken_factors_are_refused(pipe, files, data):
    tensors, needles = kohya_breaks(data.draw, np.random.default_rng(data.draw(st.integers(0, 99))))
    assert_refused(pipe, write(fresh(files), tensors), *needles)


CONFIG_BREAKS = (("not_json", None), ("list", None), ("number", None), ("lora_alpha", "8"), ("lora_alpha", None),
                 ("r", "4"), ("r", 0), ("r", 5), ("use_rslora", "yes"), ("alpha_pattern", {"(": 1}),
                 ("rank_pattern", {"to_q": -2}), ("peft_type", "LOHA"), ("use_dora", True), ("weights", None))


@settings(max_examples=len(CONFIG_BREAKS) * 2, **SETTINGS)
@given(data=st.data(), broken=st.sampled_from(CONFIG_BREAKS))
def test_peft_folders_with_a_broken_config_are_refused(pipe, shapes, files, data, broken):
    field, value = broken
    folder = Path(tempfile.mkdtemp(dir=files))
    tensors = {key.replace("transformer.", "base_model.model."): value
               for key, value in valid_pair(shapes, "transformer_blocks.0.attn.to_q", np.random.default_rng(3),
                                            rank=4).items()}
    write(folder / "adapter_model.safetensors", tensors)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["to_q"]}
    text = {"not_json": data.draw(st.text(TEXT, min_size=1, max_size=30).filter(lambda text: not _parses(text))),
            "list": "[1, 2]", "number": "4"}.get(field)
    if field == "lora_alpha" and value is None:
        text = json.dumps(config).replace('"lora_alpha": 8', '"lora_alpha": NaN')
    elif field == "weights":
        (folder / "adapter_model.safetensors").unlink()
    elif text is None:
        config[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(config) if text is None else text)
    needles = (field,) if field in config and text is None or field == "lora_alpha" else ()
    assert_refused(pipe, folder, *needles)


# -- the Python API's arguments -------------------------------------------------------------------------------

WEIGHT_BREAKS = (math.nan, math.inf, -math.inf, "heavy", True, [1.0, 2.0], {"transformer": 1.0}, [{"a": 1}],
                 1e400 * 0, object())


@settings(max_examples=30, **SETTINGS)
@given(names_=st.sampled_from((5, 5.0, b"x", {"a": 1}, [5], [None], [("a",)], [("a", "heavy")], [("a", math.nan)],
                               ["a:nan"], ["a:inf"], [1.5], list(map(str, range(17))), object())))
def test_set_adapters_refuses_arguments_of_the_wrong_type(pipe, names_):
    with pytest.raises(InvalidRequest, match="adapter_names|LoRA weight") as caught:
        pipe.set_adapters(names_)
    assert "\n" not in str(caught.value) and pipe.adapters == ()


@settings(max_examples=20, **SETTINGS)
@given(weights=st.sampled_from(WEIGHT_BREAKS))
def test_set_adapters_refuses_weights_that_are_not_one_number_per_adapter(pipe, files, shapes, weights):
    path = write(files / "weights.safetensors", valid_pair(shapes, "transformer_blocks.0.attn.to_q",
                                                           np.random.default_rng(4)))
    with pytest.raises(InvalidRequest, match="adapter_weights") as caught:
        pipe.set_adapters([path], adapter_weights=weights)
    assert "\n" not in str(caught.value) and pipe.adapters == ()


def test_weights_that_overflow_the_layer_are_refused(pipe, shapes, files):
    """Finite factors whose update passes float32 (or the folder's float16): the layer named, nothing drawn."""
    path = write(files / "huge.safetensors", {key: np.full(value.shape, 1e20, np.float32) for key, value in
                                              valid_pair(shapes, "transformer_blocks.0.attn.to_q",
                                                         np.random.default_rng(5)).items()})
    assert_refused(pipe, path, "transformer_blocks.0.attn.to_q", "beyond")
    normal = write(files / "normal.safetensors", valid_pair(shapes, "transformer_blocks.0.attn.to_q",
                                                            np.random.default_rng(5)))
    assert_refused(pipe, LoraAdapter(normal, 1e38), "transformer_blocks.0.attn.to_q", "beyond")


# -- valid adapters still load --------------------------------------------------------------------------------

@settings(max_examples=8, **SETTINGS)
@given(data=st.data())
def test_generated_valid_adapters_give_the_formulas_deltas(pipe, shapes, files, data):
    """diffusers files (with and without saved alphas) and kohya files in F16, BF16, F32 and F64: what ovsd3
    multiplies out is weight x alpha / rank x B @ A of the values as stored."""
    dtype = data.draw(st.sampled_from(("F16", "BF16", "F32", "F64")))
    rank, alpha, weight = data.draw(st.integers(1, 4)), data.draw(st.sampled_from((None, 1.0, 8.0))), 0.5
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    module = data.draw(linear(shapes))
    (A, B), path = (factor(rng, rank, shapes[module][1]), factor(rng, shapes[module][0], rank)), None
    name = fresh(files)
    if data.draw(st.booleans()) or module not in KOHYA_NAMES:
        metadata = None if alpha is None else {"lora_adapter_metadata": json.dumps(
            {"transformer.r": rank, "transformer.lora_alpha": alpha})}
        path = write(name, {f"transformer.{module}.lora_A.weight": encoded(A, dtype),
                            f"transformer.{module}.lora_B.weight": encoded(B, dtype)}, metadata)
    else:
        kohya = KOHYA_NAMES[module]
        tensors = {f"{kohya}.lora_down.weight": encoded(A, dtype), f"{kohya}.lora_up.weight": encoded(B, dtype)}
        if alpha is not None:
            tensors[f"{kohya}.alpha"] = encoded(np.array(alpha), dtype)
        path = write(name, tensors)
    factors, _ = read_adapter(path, block_count=2)
    deltas = adapter_deltas([(LoraAdapter(path, weight), factors)], shapes)
    scale = 1.0 if alpha is None else alpha / rank
    expected = np.float32(weight * scale) * (as_read(B, dtype) @ as_read(A, dtype))
    assert list(deltas) == [module]
    np.testing.assert_allclose(deltas[module], expected, rtol=1e-6, atol=1e-7)
    pipe.set_adapters(path, adapter_weights=weight)  # compiles: the adapter fits the IR
    assert pipe.adapters == (LoraAdapter(path, weight),)
    pipe.set_adapters([])


KOHYA_NAMES = {"context_embedder": "lora_unet_context_embedder",
               "transformer_blocks.0.ff.net.0.proj": "lora_unet_joint_blocks_0_x_block_mlp_fc1",
               "transformer_blocks.1.attn.to_out.0": "lora_unet_joint_blocks_1_x_block_attn_proj",
               "proj_out": "lora_unet_final_layer_linear"}


def test_a_valid_generated_adapter_changes_the_picture(pipe, shapes, files):
    rng = np.random.default_rng(6)
    tensors = {}
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2", "proj_out"):
        tensors.update(valid_pair(shapes, module, rng, rank=4))
    path = write(files / "valid.safetensors", {key: value * 5 for key, value in tensors.items()})
    call = dict(prompt="a cat", seed=1, num_inference_steps=2, width=64, height=64, output_type="np")
    plain = pipe(**call).images
    pipe.set_adapters([path])
    try:
        adapted = pipe(**call).images
    finally:
        pipe.set_adapters([])
    assert np.isfinite(adapted).all() and np.abs(adapted - plain).max() > 1e-3


# -- the command line -----------------------------------------------------------------------------------------

def _bad_files(folder: Path, shapes) -> dict[str, tuple[Path, str]]:
    rng = np.random.default_rng(7)
    good = valid_pair(shapes, "transformer_blocks.0.attn.to_q", rng)
    nan = {key: np.full_like(value, math.nan) for key, value in good.items()}
    qkv = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": factor(rng, 2, 32),
           "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": factor(rng, 95, 2)}
    elsewhere = {key.replace("blocks.0", "blocks.7"): value for key, value in good.items()}
    return {"nan": (write(folder / "nan.safetensors", nan), "NaN or infinite"),
            "metadata": (write(folder / "meta.safetensors", good, {"lora_adapter_metadata": "{oops"}),
                         "lora_adapter_metadata is not JSON"),
            "qkv": (write(folder / "qkv.safetensors", qkv), "3 equal parts"),
            "f8": (write(folder / "f8.safetensors", {**good, next(iter(good)): ("F8_E4M3", [2, 32], bytes(64))}),
                   "F8_E4M3"),
            "layer": (write(folder / "layer.safetensors", elsewhere), "transformer_blocks.7.attn.to_q")}


def _one_line(completed: subprocess.CompletedProcess, command: str, *needles: str) -> None:
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2, completed.stderr
    assert len(lines) == 1 and lines[0].startswith(f"ovsd3 {command}: error: LoRA"), completed.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("case", ["nan", "metadata", "qkv", "f8", "layer"])
def test_run_with_a_bad_lora_exits_2_with_one_line(ov_sd3, shapes, tmp_path, case):
    path, needle = _bad_files(tmp_path, shapes)[case]
    command = [sys.executable, "-m", "ovsd3", "run", str(ov_sd3), "--prompt", "a", "--steps", "1", "--no-cache",
               "--device", "CPU", "--lora", str(path), "--output", str(tmp_path / "out")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    _one_line(completed, "run", str(path), needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["nan", "layer"])
def test_serve_with_a_bad_lora_exits_2_at_start(ov_sd3, shapes, tmp_path, case):
    path, needle = _bad_files(tmp_path, shapes)[case]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    completed = subprocess.run([sys.executable, "-m", "ovsd3", "serve", str(ov_sd3), "--device", "CPU", "--port",
                                str(port), "--lora", str(path)], capture_output=True, text=True, timeout=300)
    _one_line(completed, "serve", str(path), needle)


def test_convert_refuses_a_bad_flash_lora_before_exporting(tiny_sd3, tmp_path, capsys):
    from ovsd3.cli import main

    folder = tmp_path / "adapter"
    folder.mkdir()
    write(folder / "adapter_model.safetensors",
          {"base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": np.full((4, 32), math.nan, np.float32),
           "base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((32, 4), np.float32)})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    code = main(["convert", str(tiny_sd3), str(tmp_path / "out"), "--flash-lora", str(folder)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("ovsd3 convert: error: LoRA") and "NaN or infinite" in err[-1], err
    assert not (tmp_path / "out").exists()
