"""Checkpoint conversion: transformers folders <-> diffjax params <-> the diffjax format."""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from reference import random_hf_model, save_hf
from transformers import DiffusionGemmaForBlockDiffusion, DiffusionGemmaGenerationConfig

import convert
import convert.atomic
import convert.finite
import convert.native
import diffjax
from convert import CheckpointError
from convert.__main__ import main as cli_main
from convert.tree import flatten
from diffjax import Config, param_shapes
from diffjax.config import FULL, SLIDING
from diffjax.sharding import make_mesh

# Two blocks of (sliding, full): exercises the stacked block axis (layer i -> block i // 2, slot i % 2).
CONFIG = Config.tiny(layer_types=(SLIDING, FULL, SLIDING, FULL))
REPO = pathlib.Path(__file__).resolve().parents[1]
DEC, ENC = "model.decoder.", "model.encoder.language_model."


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def hf_model() -> DiffusionGemmaForBlockDiffusion:
    return random_hf_model(CONFIG, seed=3)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> pathlib.Path:
    return save_hf(hf_model, tmp_path_factory.mktemp("hf") / "single")


@pytest.fixture(scope="module")
def sharded_dir(hf_model, tmp_path_factory) -> pathlib.Path:
    return save_hf(hf_model, tmp_path_factory.mktemp("hf") / "sharded", max_shard_size="20KB")


@pytest.fixture(scope="module")
def state(hf_model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="module")
def reference_params(hf_dir) -> dict:
    return convert.load_hf(hf_dir)[1]


def _tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(folder / "model.safetensors")


def _variant(src: pathlib.Path, dst: pathlib.Path, tensors: dict[str, np.ndarray]) -> pathlib.Path:
    """A copy of the folder `src` whose weights file holds `tensors`."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    safetensors.numpy.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _assert_trees_equal(a, b) -> None:
    """Same structure, shapes, dtypes and bytes."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))


def _leaf(params: dict, layer: int, *path: str) -> np.ndarray:
    block, j = CONFIG.layer_slot(layer)
    node = params["blocks"][f"layer_{j}"]
    for key in path:
        node = node[key]
    return np.asarray(node)[block]


def _raw_safetensors(path: pathlib.Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


# ------------------------------------------------------------------------------- loading HF


def test_load_hf_single_file_maps_every_tensor(hf_dir, state):
    config, params = convert.load_hf(hf_dir)
    assert config == CONFIG
    assert np.array_equal(np.asarray(params["embedder"]["embedding"]), state[DEC + "embed_tokens.weight"])
    assert np.array_equal(np.asarray(params["final_norm"]["scale"]), state[DEC + "norm.weight"])
    sc = params["self_conditioning"]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert np.array_equal(
            np.asarray(sc["mlp"][proj]["kernel"]), state[f"{DEC}self_conditioning.{proj}.weight"].T
        )
    assert np.array_equal(np.asarray(sc["pre_norm"]["scale"]), state[DEC + "self_conditioning.pre_norm.weight"])
    for i in range(CONFIG.num_layers):
        pre = f"{DEC}layers.{i}."
        for proj in ("q_proj", "k_proj", "o_proj"):
            assert np.array_equal(_leaf(params, i, "self_attn", proj, "kernel"), state[f"{pre}self_attn.{proj}.weight"].T)
        for norm in ("q_norm", "k_norm"):
            assert np.array_equal(_leaf(params, i, "self_attn", norm, "scale"), state[f"{pre}self_attn.{norm}.weight"])
        block_layer = params["blocks"][f"layer_{CONFIG.layer_slot(i)[1]}"]
        assert ("v_proj" in block_layer["self_attn"]) == (CONFIG.layer_types[i] == SLIDING)
        if CONFIG.layer_types[i] == SLIDING:
            assert np.array_equal(_leaf(params, i, "self_attn", "v_proj", "kernel"), state[pre + "self_attn.v_proj.weight"].T)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert np.array_equal(_leaf(params, i, "mlp", proj, "kernel"), state[f"{pre}mlp.{proj}.weight"].T)
        assert np.array_equal(_leaf(params, i, "router", "proj", "kernel"), state[pre + "router.proj.weight"].T)
        assert np.array_equal(_leaf(params, i, "router", "scale"), state[pre + "router.scale"])
        assert np.array_equal(_leaf(params, i, "router", "per_expert_scale"), state[pre + "router.per_expert_scale"])
        assert np.array_equal(_leaf(params, i, "experts", "gate_up_proj"), state[pre + "experts.gate_up_proj"].swapaxes(1, 2))
        assert np.array_equal(_leaf(params, i, "experts", "down_proj"), state[pre + "experts.down_proj"].swapaxes(1, 2))
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                     "pre_feedforward_layernorm_2"):
            assert np.array_equal(_leaf(params, i, norm, "scale"), state[f"{pre}{norm}.weight"])
        # The two layer_scalar sets are different tensors and both survive.
        enc = state[f"{ENC}layers.{i}.layer_scalar"]
        assert np.array_equal(_leaf(params, i, "decoder_layer_scalar"), state[pre + "layer_scalar"])
        assert np.array_equal(_leaf(params, i, "encoder_layer_scalar"), enc)
        assert not np.array_equal(enc, state[pre + "layer_scalar"])


def test_default_tiny_config_single_block(tmp_path):
    """The parity tests' path: Config.tiny() (one block of 4 layers) from save_pretrained."""
    folder = save_hf(random_hf_model(Config.tiny(), seed=0), tmp_path / "tiny")
    config, params = convert.load_hf(folder)
    assert config == Config.tiny()
    _assert_trees_equal(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(config, np.float32)),
                        jax.tree.map(lambda a: np.zeros_like(np.asarray(a)), params))


def test_dtype_cast_bfloat16_matches_param_shapes(hf_dir, reference_params):
    config, params = convert.load_hf(hf_dir, dtype="bfloat16")
    expected = param_shapes(config)  # bfloat16 by default
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want, f32 in zip(jax.tree.leaves(params), jax.tree.leaves(expected), jax.tree.leaves(reference_params),
                              strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype == jax.numpy.bfloat16
        assert np.array_equal(np.asarray(got), np.asarray(f32).astype(ml_dtypes.bfloat16))
    # Other spellings of the same request.
    _, params16 = convert.load_hf(hf_dir, dtype=jax.numpy.float16)
    assert params16["embedder"]["embedding"].dtype == np.float16
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        convert.load_hf(hf_dir, dtype="int8")


def test_sharded_equals_single_file(sharded_dir, reference_params):
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("model-*.safetensors"))) > 3
    _, params = convert.load_hf(sharded_dir)
    _assert_trees_equal(params, reference_params)


def test_encoder_names_only(hf_dir, tmp_path, reference_params):
    renamed = {}
    for name, value in _tensors(hf_dir).items():
        shared = name.startswith(DEC) and "self_conditioning" not in name and not name.endswith("layer_scalar")
        renamed[ENC + name[len(DEC):] if shared else name] = value
    assert not any(n.startswith(DEC + "layers.0.self_attn") for n in renamed)
    _, params = convert.load_hf(_variant(hf_dir, tmp_path / "enc", renamed))
    _assert_trees_equal(params, reference_params)


def test_both_names_prefers_decoder(hf_dir, tmp_path, reference_params):
    tensors = _tensors(hf_dir)
    both = dict(tensors)
    for name, value in tensors.items():
        if name.startswith(DEC) and "self_conditioning" not in name and not name.endswith("layer_scalar"):
            both[ENC + name[len(DEC):]] = np.zeros_like(value)  # a differing duplicate: the decoder's wins
    _, params = convert.load_hf(_variant(hf_dir, tmp_path / "both", both))
    _assert_trees_equal(params, reference_params)


def test_lm_head_and_vision_skipped(hf_dir, tmp_path, reference_params, caplog):
    tensors = _tensors(hf_dir)
    n_vision = sum(n.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision.")) for n in tensors)
    assert n_vision > 0
    tensors["lm_head.weight"] = tensors[DEC + "embed_tokens.weight"]
    with caplog.at_level(logging.INFO, logger="convert"):
        _, params = convert.load_hf(_variant(hf_dir, tmp_path / "lm_head", tensors))
    _assert_trees_equal(params, reference_params)
    assert f"skipped {n_vision} vision tensors" in caplog.text
    no_vision = {n: v for n, v in tensors.items() if "vision" not in n}
    _, params = convert.load_hf(_variant(hf_dir, tmp_path / "text_only", no_vision))
    _assert_trees_equal(params, reference_params)


@pytest.mark.parametrize("mesh", [False, True], ids=["host", "mesh"])
@pytest.mark.parametrize("owner", ["encoder", "decoder"])
def test_one_layer_scalar_set_missing_defaults_to_one(hf_dir, tmp_path, reference_params, caplog, owner, mesh):
    """Also through the mesh loader, which fills defaulted scalars in its own per-shard callback (a 1-device
    mesh runs that code; tests/test_sharding.py covers real multi-device layouts)."""
    prefix = ENC if owner == "encoder" else DEC
    tensors = {n: v for n, v in _tensors(hf_dir).items() if not (n.startswith(prefix) and n.endswith("layer_scalar"))}
    with caplog.at_level(logging.WARNING, logger="convert"):
        _, params = convert.load_hf(_variant(hf_dir, tmp_path / owner, tensors), mesh=make_mesh() if mesh else None)
    assert "layer_scalar buffer(s) absent" in caplog.text
    other = "decoder" if owner == "encoder" else "encoder"
    for j in range(CONFIG.layer_period):
        got = params["blocks"][f"layer_{j}"]
        ref = reference_params["blocks"][f"layer_{j}"]
        assert np.all(np.asarray(got[f"{owner}_layer_scalar"]) == 1.0)
        assert np.array_equal(np.asarray(got[f"{other}_layer_scalar"]), np.asarray(ref[f"{other}_layer_scalar"]))


# -------------------------------------------------------------------------------------- errors


def test_error_missing_config(hf_dir, tmp_path):
    folder = tmp_path / "noconfig"
    folder.mkdir()
    shutil.copy(hf_dir / "model.safetensors", folder)
    with pytest.raises(CheckpointError, match=r"missing config\.json: .*noconfig/config\.json"):
        convert.load_hf(folder)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        convert.load_hf(tmp_path / "nowhere")


def test_error_unknown_model_type(hf_dir, tmp_path):
    folder = tmp_path / "gemma3"
    shutil.copytree(hf_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gemma3"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown model_type 'gemma3'"):
        convert.load_hf(folder)


def test_error_no_weights(hf_dir, tmp_path):
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copy(hf_dir / "config.json", folder)
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        convert.load_hf(folder)


def test_error_missing_and_unexpected_tensors_listed(hf_dir, tmp_path):
    tensors = _tensors(hf_dir)
    del tensors[DEC + "layers.2.mlp.up_proj.weight"]
    del tensors[DEC + "self_conditioning.pre_norm.weight"]
    for name in [n for n in tensors if n.endswith("layer_scalar") and ".layers.1." in n]:
        del tensors[name]  # both scalars of one layer gone: an error, not a default
    tensors[DEC + "layers.0.mystery.weight"] = np.zeros(3, np.float32)
    tensors[ENC + "self_conditioning.pre_norm.weight"] = np.zeros(64, np.float32)  # no encoder copy exists
    with pytest.raises(CheckpointError, match="missing tensors: 4") as info:
        convert.load_hf(_variant(hf_dir, tmp_path / "broken", tensors))
    message = str(info.value)
    for name in ("model.decoder.layers.2.mlp.up_proj.weight", "model.decoder.self_conditioning.pre_norm.weight",
                 "model.decoder.layers.1.layer_scalar", "model.encoder.language_model.layers.1.layer_scalar"):
        assert name in message
    assert "unexpected tensors (map to no parameter): 2" in message
    assert "model.decoder.layers.0.mystery.weight" in message
    assert "model.encoder.language_model.self_conditioning.pre_norm.weight" in message


def test_error_shape_mismatch(hf_dir, tmp_path):
    tensors = _tensors(hf_dir)
    tensors[DEC + "layers.1.self_attn.q_proj.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch: 1\n  model\.decoder\.layers\.1\.self_attn\.q_proj\.weight: expected \[128, 64\], got \[64, 32\]",
    ):
        convert.load_hf(_variant(hf_dir, tmp_path / "shape", tensors))


def _corrupt_copy(hf_dir: pathlib.Path, tmp_path: pathlib.Path, name: str) -> pathlib.Path:
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(hf_dir / "config.json", folder)
    return folder


def test_error_truncated_file(hf_dir, tmp_path):
    folder = _corrupt_copy(hf_dir, tmp_path, "truncated")
    data = (hf_dir / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated safetensors file: tensor .* beyond the end of the file"):
        convert.load_hf(folder)
    (folder / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        convert.load_hf(folder)


def test_error_header_larger_than_file(hf_dir, tmp_path):
    folder = _corrupt_copy(hf_dir, tmp_path, "bighead")
    _raw_safetensors(folder / "model.safetensors", b"{}", length=10**6)
    with pytest.raises(CheckpointError, match=r"header size 1000000 is larger than the file \(10 bytes\)"):
        convert.load_hf(folder)


def test_error_bad_json(hf_dir, tmp_path):
    folder = _corrupt_copy(hf_dir, tmp_path, "badjson")
    _raw_safetensors(folder / "model.safetensors", b'{"a": [1, 2')
    with pytest.raises(CheckpointError, match="bad JSON header"):
        convert.load_hf(folder)


def test_error_unknown_dtype(hf_dir, tmp_path):
    folder = _corrupt_copy(hf_dir, tmp_path, "dtype")
    _raw_safetensors(folder / "model.safetensors",
                     {"x": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(CheckpointError, match="tensor 'x' has unknown or unsupported dtype 'Q7'"):
        convert.load_hf(folder)


def test_error_offsets_beyond_file(hf_dir, tmp_path):
    folder = _corrupt_copy(hf_dir, tmp_path, "offsets")
    _raw_safetensors(folder / "model.safetensors",
                     {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"tensor 'x' data_offsets end at byte .* beyond the end of the file"):
        convert.load_hf(folder)
    _raw_safetensors(folder / "model.safetensors",
                     {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"data_offsets \[0, 12\] do not hold F32 \[4\]"):
        convert.load_hf(folder)


def test_error_index_names_missing_shard(sharded_dir, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(sharded_dir, folder)
    next(folder.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"names missing shard\(s\): model-00002-of-\d+\.safetensors"):
        convert.load_hf(folder)


def test_error_index_disagrees_with_shards(sharded_dir, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(sharded_dir, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"]["model.decoder.not_there.weight"] = index["weight_map"][first]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lists tensor\(s\) its shard does not hold: 1\n  model\.decoder\.not_there"):
        convert.load_hf(folder)


# ------------------------------------------------------------------------------- our format


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_round_trip_bit_identical(hf_dir, tmp_path, dtype):
    config, params = convert.load_hf(hf_dir, dtype=dtype)
    generation = {"max_new_tokens": 64, "entropy_bound": 0.2, "eos_token_id": [1, 106], "t_min": None}
    dst = convert.save(params, config, tmp_path / "ckpt", generation)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "generation_config.json", "params.safetensors"]
    assert Config.from_hf(json.loads((dst / "config.json").read_text())) == config
    loaded_config, loaded = convert.load(dst)
    assert loaded_config == config
    _assert_trees_equal(loaded, params)
    public_config, public = diffjax.load(dst)  # the package-level name users reach for
    assert public_config == config
    _assert_trees_equal(public, params)
    assert convert.load_generation_config(dst) == {"max_new_tokens": 64, "entropy_bound": 0.2, "eos_token_id": [1, 106]}
    # Flat "/"-joined keys, readable by the reference safetensors implementation, bytes unchanged.
    with safetensors.safe_open(dst / "params.safetensors", "pt") as f:
        assert f.metadata() == {"format": "diffjax", "format_version": "1"}
        flat = flatten(params)
        assert set(f.keys()) == {"/".join(p) for p in flat}
        kernel = f.get_tensor("blocks/layer_0/self_attn/q_proj/kernel")
        want = np.asarray(flat[("blocks", "layer_0", "self_attn", "q_proj", "kernel")])
        assert kernel.view(torch.int16 if dtype == "bfloat16" else torch.int32).numpy().tobytes() == want.tobytes()


def test_load_casts_and_rejects_foreign_folders(hf_dir, tmp_path, reference_params):
    dst = convert.save(reference_params, CONFIG, tmp_path / "ckpt")
    _, bf16 = convert.load(dst, dtype="bfloat16")
    assert bf16["final_norm"]["scale"].dtype == jax.numpy.bfloat16
    with pytest.raises(CheckpointError, match=r"no params\.safetensors"):
        convert.load(hf_dir)


def test_save_rejects_params_of_another_config(reference_params, tmp_path):
    with pytest.raises(CheckpointError, match="shape mismatch for embedder/embedding"):
        convert.save(reference_params, CONFIG.replace(vocab_size=1024), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_failure_leaves_nothing(reference_params, tmp_path, monkeypatch):
    real = convert.native.write_safetensors

    def half_then_fail(path, tensors, metadata=None, on_tensor=None):
        real(path, dict(list(tensors.items())[:3]), metadata, on_tensor)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(convert.native, "write_safetensors", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        convert.save(reference_params, CONFIG, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    assert _leftovers(tmp_path) == []


def test_atomic_overwrite(reference_params, tmp_path, monkeypatch):
    dst = convert.save(reference_params, CONFIG, tmp_path / "ckpt", {"max_new_tokens": 32})
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    with pytest.raises(FileExistsError, match="already exists"):
        convert.save(reference_params, CONFIG, dst)

    def fail(*args, **kwargs):
        raise OSError("crash mid-write (simulated)")

    monkeypatch.setattr(convert.native, "write_safetensors", fail)
    with pytest.raises(OSError, match="crash mid-write"):
        convert.save(reference_params, CONFIG, dst, overwrite=True)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before  # the old checkpoint survived
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()

    bf16 = jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), reference_params)
    convert.save(bf16, CONFIG, dst, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "params.safetensors"]
    _assert_trees_equal(convert.load(dst)[1], bf16)
    assert _leftovers(tmp_path) == []


def test_atomic_overwrite_restores_old_when_install_fails(reference_params, tmp_path, monkeypatch):
    """Without an atomic exchange (not Linux, or a filesystem that refuses it): two renames, undone on failure."""
    dst = convert.save(reference_params, CONFIG, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    monkeypatch.setattr(convert.atomic, "_exchange", lambda a, b: False)
    real_rename = os.rename
    calls = []

    def rename(src, target):
        calls.append((pathlib.Path(src).name, pathlib.Path(target).name))
        if len(calls) == 2:  # old moved aside; now installing the new directory fails
            raise OSError("rename failed (simulated)")
        return real_rename(src, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        convert.save(reference_params, CONFIG, dst, overwrite=True)
    monkeypatch.undo()
    assert calls[0][0] == "ckpt" and calls[1][1] == "ckpt"
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(convert.atomic._renameat2 is None, reason="renameat2 is Linux-only")
def test_atomic_overwrite_swaps_in_one_step(reference_params, tmp_path, monkeypatch):
    """With renameat2(RENAME_EXCHANGE) the destination is never absent: no rename moves the old one aside,
    and a crash after the swap (here while deleting the old one) leaves the new one complete in place."""
    dst = convert.save(reference_params, CONFIG, tmp_path / "ckpt", {"max_new_tokens": 32})

    def no_rename(*args):
        raise AssertionError("the old destination was moved aside instead of swapped")

    def crash(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", no_rename)
    monkeypatch.setattr(convert.atomic, "_remove", crash)
    bf16 = jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), reference_params)
    with pytest.raises(KeyboardInterrupt):
        convert.save(bf16, CONFIG, dst, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "params.safetensors"]
    _assert_trees_equal(convert.load(dst)[1], bf16)
    assert _leftovers(tmp_path) == []  # the old one was deleted on the way out


def _not_a_checkpoint(folder: pathlib.Path, case: str) -> tuple[pathlib.Path, str]:
    """A destination --overwrite must not delete, and the reason the refusal gives."""
    if case == "file":
        folder.write_text("notes")
        return folder, "is a file, not a checkpoint folder"
    folder.mkdir()
    if case == "notes":
        for k in range(7):
            (folder / f"notes-{k}.txt").write_text("keep me")
        return folder, "holds files that are not part of a checkpoint (notes-0.txt, notes-1.txt, notes-2.txt, " \
                       "notes-3.txt, notes-4.txt, and 2 more)"
    for name in ("config.json", "params.safetensors", "generation_config.json"):
        (folder / name).write_text("{}")
    if case == "checkpoint_and_notes":
        (folder / "notes.txt").write_text("keep me")
        return folder, "holds files that are not part of a checkpoint (notes.txt)"
    if case == "training_run":  # diffjax train --out: its train_state/ is never the converter's
        (folder / "task.json").write_text("{}")
        (folder / "train_state").mkdir()
        (folder / "train_state" / "1").write_text("state")
        return folder, "holds files that are not part of a checkpoint (train_state/)"
    assert case == "no_weights"
    (folder / "params.safetensors").unlink()
    return folder, "is not a checkpoint (it lacks config.json or a weights file"


@pytest.mark.parametrize("case", ["notes", "checkpoint_and_notes", "training_run", "no_weights", "file"])
def test_overwrite_refuses_what_is_not_a_checkpoint(reference_params, tmp_path, capsys, case):
    """`--overwrite SRC ~/` or a typo'd path to a folder of notes used to delete it once converted: refused,
    before the (here missing) source is read, by the library for every writer and CLI."""
    dst, reason = _not_a_checkpoint(tmp_path / "dst", case)
    before = _tree_bytes(tmp_path)
    message = f"destination {dst} {reason}"
    missing = tmp_path / "no-such-source"
    with pytest.raises(CheckpointError, match=re.escape(message)) as info:
        convert.convert_checkpoint(missing, dst, overwrite=True)
    assert "choose another destination or remove it yourself" in str(info.value)
    for write in (convert.save, convert.save_hf):
        with pytest.raises(CheckpointError, match=re.escape(message)):
            write(reference_params, CONFIG, dst, overwrite=True)
    for argv in ([str(missing), str(dst), "--overwrite", "-q"], [str(missing), str(dst), "--overwrite", "-q", "--to-hf"]):
        assert cli_main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert _tree_bytes(tmp_path) == before and _leftovers(tmp_path) == []


def test_overwrite_replaces_empty_folders_and_checkpoints(hf_dir, sharded_dir, reference_params, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    convert.convert_checkpoint(hf_dir, dst, overwrite=True)  # empty
    (dst / "tokenizer.json").write_text("{}")
    (dst / "task.json").write_text("{}")  # diffjax train's export beside the weights
    shutil.copy(hf_dir / "config.json", dst / "generation_config.json")
    convert.save_hf(reference_params, CONFIG, dst, overwrite=True, max_shard_size="100KB")  # a diffjax checkpoint
    assert (dst / "model.safetensors.index.json").is_file() and not (dst / "params.safetensors").exists()
    convert.convert_checkpoint(hf_dir, dst, overwrite=True)  # a sharded transformers one
    # transformers' generation_config.json comes through (with only the keys we carry): the old one is gone.
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "generation_config.json", "params.safetensors"]
    assert convert.load_generation_config(dst, carried=True) == convert.load_generation_config(hf_dir, carried=True)
    shutil.rmtree(dst)
    shutil.copytree(sharded_dir, dst)  # what transformers' save_pretrained wrote
    convert.convert_checkpoint(hf_dir, dst, overwrite=True)
    _assert_trees_equal(convert.load(dst)[1], reference_params)
    assert _leftovers(tmp_path) == []


def test_overwrite_rechecks_the_destination_before_replacing_it(reference_params, tmp_path, monkeypatch):
    """A file put into the old checkpoint while the new one was being written is not deleted with it."""
    dst = convert.save(reference_params, CONFIG, tmp_path / "ckpt")
    real = convert.native.write_safetensors

    def write_then_meddle(*args, **kwargs):
        real(*args, **kwargs)
        (dst / "notes.txt").write_text("written meanwhile")

    monkeypatch.setattr(convert.native, "write_safetensors", write_then_meddle)
    with pytest.raises(CheckpointError, match=re.escape(f"destination {dst} holds files that are not part of a "
                                                        "checkpoint (notes.txt)")):
        convert.save(reference_params, CONFIG, dst, overwrite=True)
    assert (dst / "notes.txt").read_text() == "written meanwhile" and (dst / "params.safetensors").is_file()
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------- NaN / inf


_FLOATS = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2,
           ml_dtypes.float8_e4m3fnuz]


@pytest.mark.parametrize("dtype", _FLOATS, ids=lambda d: np.dtype(d).name)
def test_count_nonfinite_agrees_with_isfinite_on_every_bit_pattern(dtype, monkeypatch):
    """Every 8- and 16-bit pattern (random ones for the wider types): the bit test counts what np.isfinite
    calls NaN or inf. float8_e4m3fn has no inf, only NaN (S.1111.111), and 448 is finite; the "fnuz" float8s
    (NaN is -0's bits) take the np.isfinite path. Chunks of 1000 cross the chunk boundary mid-array."""
    from convert.finite import count_nonfinite

    monkeypatch.setattr(convert.finite, "_CHUNK", 1000)
    dtype = np.dtype(dtype)
    bits = np.dtype(f"u{dtype.itemsize}")
    if dtype.itemsize <= 2:
        patterns = np.arange(2 ** (8 * dtype.itemsize), dtype=np.uint32).astype(bits)
    else:
        patterns = np.random.default_rng(0).integers(0, np.iinfo(bits).max, 5000, dtype=bits, endpoint=True)
        patterns[::7] |= bits.type(np.iinfo(bits).max >> 1) ^ bits.type(np.iinfo(bits).max >> (1 + ml_dtypes.finfo(dtype).nexp))  # exponent all ones
    values = patterns.view(dtype).reshape(-1, 8)
    want = int(np.count_nonzero(~np.isfinite(values)))
    assert want > 0 and count_nonfinite(values) == want
    finite = np.where(np.isfinite(values), values, dtype.type(0))
    assert count_nonfinite(finite) == 0
    assert count_nonfinite(np.array([ml_dtypes.finfo(dtype).max, -ml_dtypes.finfo(dtype).max], dtype)) == 0
    assert count_nonfinite(np.zeros((0, 3), dtype)) == 0
    if dtype == ml_dtypes.float8_e4m3fn:
        assert count_nonfinite(np.array([0x7F, 0xFF, 0x7E, 0xFE], np.uint8).view(dtype)) == 2


def test_refuse_nonfinite_in_fp8_experts_and_their_scales(reference_params):
    """A quantized tree (float8_e4m3fn experts, float32 scales) is all finite; a NaN code in an expert weight
    and an inf scale are each named with their first index."""
    from convert.finite import count_nonfinite, refuse_nonfinite
    from diffjax.quantize import quantize_model

    bf16 = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), reference_params)
    flat = flatten(quantize_model(CONFIG, bf16)[1])
    assert all(count_nonfinite(np.asarray(leaf)) == 0 for leaf in flat.values())
    weight = np.array(flat[("blocks", "layer_0", "experts", "gate_up_proj")])
    assert weight.dtype == ml_dtypes.float8_e4m3fn
    weight.view(np.uint8)[1, 3, 5, 7] = 0xFF  # -NaN
    with pytest.raises(CheckpointError, match=r"tensor 'gate_up_proj' holds NaN or inf: 1 of the \d+ values read, "
                                              r"the first nan at \[1, 3, 5, 7\]"):
        refuse_nonfinite(weight, "gate_up_proj", "quantized")
    scale = np.array(flat[("blocks", "layer_0", "experts", "gate_up_proj_scale")])
    assert scale.dtype == np.float32
    scale[0, 2, 9] = np.inf
    with pytest.raises(CheckpointError, match=r"1 of the \d+ values read, the first inf at \[0, 2, 9\]"):
        refuse_nonfinite(scale, "gate_up_proj_scale", "quantized")


def _nonfinite_hf(hf_dir: pathlib.Path, folder: pathlib.Path, experts: bool = False) -> pathlib.Path:
    """A transformers folder with NaN and inf in a transposed tensor (first in the file's order: [3, 5]), or
    -inf in a packed expert tensor, whose last two axes swap on loading."""
    tensors = _tensors(hf_dir)
    if experts:
        tensors[DEC + "layers.2.experts.gate_up_proj"][1, 2, 3] = -np.inf
    else:
        q = tensors[DEC + "layers.1.self_attn.q_proj.weight"]
        q[100, 1], q[3, 5] = np.inf, np.nan  # in our kernel [in, out] the inf comes first
    return _variant(hf_dir, folder, tensors)


@pytest.mark.parametrize("mesh", [False, True], ids=["host", "mesh"])
def test_hf_load_refuses_nonfinite_weights(hf_dir, tmp_path, mesh):
    """NaN or inf in a checkpoint used to load and generate garbage: refused, naming the tensor, the count and
    the first value in the file's layout (both loaders: one scan helper)."""
    folder = _nonfinite_hf(hf_dir, tmp_path / "nan")
    message = (f"{folder / 'model.safetensors'}: tensor '{DEC}layers.1.self_attn.q_proj.weight' holds NaN or inf: "
               "2 of the 8192 values read, the first nan at [3, 5]")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        convert.load_hf(folder, mesh=make_mesh() if mesh else None)
    folder = _nonfinite_hf(hf_dir, tmp_path / "inf", experts=True)
    with pytest.raises(CheckpointError, match=re.escape(
            f"tensor '{DEC}layers.2.experts.gate_up_proj' holds NaN or inf: 1 of the ")
            + r"\d+" + re.escape(" values read, the first -inf at [1, 2, 3]")):
        convert.load_hf(folder, dtype="bfloat16", mesh=make_mesh() if mesh else None)


def test_convert_refuses_nonfinite_weights(hf_dir, tmp_path, capsys):
    folder = _nonfinite_hf(hf_dir, tmp_path / "nan")
    with pytest.raises(CheckpointError, match=r"q_proj\.weight' holds NaN or inf"):
        convert.convert_checkpoint(folder, tmp_path / "out")
    assert cli_main([str(folder), str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err  # the log's "skipped 16 vision tensors", then the one error line
    assert err.splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert "q_proj.weight' holds NaN or inf: 2 of" in err.splitlines()[-1]
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("mesh", [False, True], ids=["host", "mesh"])
def test_cast_that_overflows_is_refused(hf_dir, tmp_path, recwarn, mesh):
    """A float32 weight of 1e5 cast to float16 (largest finite 65504) used to load as inf, silently."""
    tensors = _tensors(hf_dir)
    tensors[DEC + "layers.0.mlp.down_proj.weight"][4, 2] = 1e5
    folder = _variant(hf_dir, tmp_path / "big", tensors)
    with pytest.raises(CheckpointError, match=re.escape(
            f"tensor '{DEC}layers.0.mlp.down_proj.weight' does not fit float16: 1 of the ")
            + r"\d+" + re.escape(" values read are not finite once cast, the first 100000.0 at [4, 2]")):
        convert.load_hf(folder, dtype="float16", mesh=make_mesh() if mesh else None)
    convert.load_hf(folder, dtype="bfloat16", mesh=make_mesh() if mesh else None)  # in range there
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # the error says it, once


def test_native_load_checks_finite_on_request(reference_params, tmp_path, capsys):
    """`save` writes params as given (a diverged run's NaN too); `load(check_finite=True)` and the converter
    reading it (--to-hf) refuse them. Off by default: a full scan costs a pass over every byte."""
    path = ("blocks", "layer_1", "experts", "down_proj")
    broken = np.array(flatten(reference_params)[path])
    broken[1, 0, 2, 3] = np.nan
    dst = convert.save(_with_leaf(reference_params, path, broken), CONFIG, tmp_path / "ckpt")
    convert.load(dst)
    message = (f"{dst / 'params.safetensors'}: tensor 'blocks/layer_1/experts/down_proj' holds NaN or inf: 1 of "
               f"the {broken.size} values read, the first nan at [1, 0, 2, 3]")
    for kwargs in ({}, {"dtype": "bfloat16"}, {"as_numpy": True}):
        with pytest.raises(CheckpointError, match=re.escape(message)):
            convert.load(dst, check_finite=True, **kwargs)
    for kwargs in ({}, {"experts_fp8": True}):  # the library's loader passes the request on, fp8 path included
        diffjax.load(dst, **kwargs)
        with pytest.raises(CheckpointError, match=re.escape(message)):
            diffjax.load(dst, check_finite=True, **kwargs)
    assert cli_main([str(dst), str(tmp_path / "hf"), "--to-hf", "-q"]) == 1
    assert capsys.readouterr().err == f"error: {message} (a corrupt or diverged checkpoint)\n"
    assert not (tmp_path / "hf").exists()

    big = np.array(flatten(reference_params)[("final_norm", "scale")])
    big[5] = -7e4
    dst = convert.save(_with_leaf(reference_params, ("final_norm", "scale"), big), CONFIG, tmp_path / "big")
    with pytest.raises(CheckpointError, match=re.escape("tensor 'final_norm/scale' does not fit float16: 1 of the "
                                                        "64 values read are not finite once cast, the first -70000.0 "
                                                        "at [5]")):
        convert.load(dst, "float16", check_finite=True)


def test_mesh_loader_names_the_first_nonfinite_index_of_the_whole_tensor(hf_dir, tmp_path):
    """Each device copies and scans only its slice, but what it reports is the whole tensor's count and first
    value, as without a mesh (4 forced CPU devices, in a subprocess: the device count is fixed when jax
    starts; the meshes split the kernel [in, out] along out, the file's rows, or keep it whole)."""
    folder = _nonfinite_hf(hf_dir, tmp_path / "nan")
    script = (
        "import convert, sys\n"
        "from diffjax.sharding import make_mesh\n"
        "for shape in [(1, 1, 4), (1, 4, 1), (2, 1, 2)]:\n"
        "    try:\n"
        "        convert.load_hf(sys.argv[1], mesh=make_mesh(*shape))\n"
        "    except convert.CheckpointError as exc:\n"
        "        print(str(exc).split(': ', 1)[1])\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script, str(folder)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == 3 * [f"tensor '{DEC}layers.1.self_attn.q_proj.weight' holds NaN or inf: 2 of "
                                            "the 8192 values read, the first nan at [3, 5] (a corrupt or diverged "
                                            "checkpoint)"]


# ------------------------------------------------------------------------- writing HF folders


def test_save_hf_loads_in_transformers_with_same_logits(hf_model, hf_dir, reference_params, tmp_path):
    generation = {"max_denoising_steps": 12, "entropy_bound": 0.3, "t_min": 0.5, "t_max": 1,
                  "eos_token_id": [1, 106], "pad_token_id": 0}
    out = convert.save_hf(reference_params, CONFIG, tmp_path / "hf_out", generation, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(out, attn_implementation="eager").eval()
    original = {k: v for k, v in hf_model.state_dict().items() if "vision" not in k}
    reloaded = model.state_dict()
    for name, value in original.items():
        assert torch.equal(reloaded[name], value), name
    assert model.generation_config.max_denoising_steps == 12
    assert model.generation_config.sampler_config.entropy_bound == 0.3
    assert model.generation_config.t_max == 1.0

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, CONFIG.vocab_size, (2, 5), generator=generator)
    canvas = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.canvas_length), generator=generator)
    with torch.no_grad():
        want = hf_model(input_ids=prompt, decoder_input_ids=canvas).logits
        got = model(input_ids=prompt, decoder_input_ids=canvas).logits
    # Every weight is equal (above), yet a reloaded model's logits differ from the in-memory one by ~1e-5
    # (float32 rounding; transformers' own save_pretrained folder reloaded shows the same deviation).
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    config, params = convert.load_hf(out)
    assert config == CONFIG
    _assert_trees_equal(params, reference_params)
    assert convert.load_generation_config(out) == {**generation, "t_max": 1.0}


def test_save_hf_single_file_bfloat16(reference_params, tmp_path):
    bf16 = jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), reference_params)
    out = convert.save_hf(bf16, CONFIG, tmp_path / "hf_bf16")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    _, params = convert.load_hf(out)
    _assert_trees_equal(params, bf16)


def test_load_generation_config_transformers_layout(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "max_new_tokens": 256, "max_denoising_steps": None, "t_min": 0.4, "t_max": 0.8,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
        "stability_threshold": 1, "confidence_threshold": 0.005, "eos_token_id": 1, "pad_token_id": 0,
        "return_dict_in_generate": True, "transformers_version": "5.23.0",
    }))
    assert convert.load_generation_config(tmp_path) == {
        "max_new_tokens": 256, "t_min": 0.4, "t_max": 0.8, "entropy_bound": 0.1, "stability_threshold": 1,
        "confidence_threshold": 0.005, "eos_token_id": [1], "pad_token_id": 0,
    }
    assert convert.load_generation_config(tmp_path / "absent") == {}
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"generation_config\.json: bad JSON"):
        convert.load_generation_config(tmp_path)


# -------------------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "convert", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_cli_end_to_end(sharded_dir, reference_params, tmp_path, capsys):
    generation = json.loads((sharded_dir / "generation_config.json").read_text())
    generation["max_new_tokens"] = 48
    # transformers' keys diffjax does not use: carried to our checkpoint and back, not handed to generate.
    carried = {"max_length": 300, "bos_token_id": 2, "cache_implementation": "static"}
    generation.update(carried)
    folder = tmp_path / "src"
    shutil.copytree(sharded_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps(generation))

    result = _cli(str(folder), str(tmp_path / "out"), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr
    config, params = convert.load(tmp_path / "out")
    assert config == CONFIG
    _assert_trees_equal(params, jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), reference_params))
    assert convert.load_generation_config(tmp_path / "out") == {"max_new_tokens": 48}
    kept = {key: value for key, value in generation.items() if key in convert.hf.CARRIED_GENERATION_KEYS}
    assert convert.load_generation_config(tmp_path / "out", carried=True) == {"max_new_tokens": 48, **kept}

    # The same entry point in-process (a subprocess each costs seconds of imports).
    assert cli_main([str(folder), str(tmp_path / "out")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_main([str(tmp_path / "out"), str(tmp_path / "hf"), "--to-hf", "-q", "--max-shard-size", "50KB"]) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    _assert_trees_equal(convert.load_hf(tmp_path / "hf")[1], params)
    back = DiffusionGemmaGenerationConfig.from_pretrained(tmp_path / "hf")
    assert (back.max_new_tokens, back.max_length, back.bos_token_id, back.cache_implementation) == (48, 300, 2, "static")
    assert cli_main([str(tmp_path / "missing"), str(tmp_path / "out2")]) == 1
    assert f"error: {tmp_path / 'missing'}: not a checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_convert_checkpoint_refuses_existing_dst_before_reading(tmp_path):
    (tmp_path / "dst").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert.convert_checkpoint(tmp_path / "does-not-exist", tmp_path / "dst")


def test_convert_checkpoint_carries_tokenizer_files(hf_dir, tmp_path, reference_params):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "chat_template.jinja").write_text("{{ bos_token }}")
    dst = convert.convert_checkpoint(src, tmp_path / "dst")
    assert (dst / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (dst / "chat_template.jinja").read_text() == "{{ bos_token }}"
    assert not (dst / "special_tokens_map.json").exists()
    _assert_trees_equal(convert.load(dst)[1], reference_params)


# ------------------------------------------------------------------------- bad input, by defect


def _tree_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", ["same", "dst_contains_src", "dst_inside_src", "through_symlink"])
def test_refuses_destination_overlapping_source(hf_dir, tmp_path, capsys, layout):
    """`--overwrite anc/hf anc` used to delete the source (and everything beside it) once converted."""
    top = tmp_path / "anc"
    src = top / "hf"
    shutil.copytree(hf_dir, src)
    (top / "unrelated.txt").write_text("keep me")
    (tmp_path / "link").symlink_to(top, target_is_directory=True)
    dst = {"same": src, "dst_contains_src": top, "dst_inside_src": src / "out",
           "through_symlink": tmp_path / "link" / "hf"}[layout]
    before = _tree_bytes(top)
    relation = {"same": "is the source", "through_symlink": "is the source", "dst_contains_src": "contains the source",
                "dst_inside_src": "is inside the source"}[layout]
    message = f"destination {dst} {relation} {src}: "
    with pytest.raises(CheckpointError, match=re.escape(message)):
        convert.convert_checkpoint(src, dst, overwrite=True)
    for argv in ([str(src), str(dst), "--overwrite", "-q"], [str(src), str(dst), "--overwrite", "-q", "--to-hf"]):
        assert cli_main(argv) == 1
        assert capsys.readouterr().err.startswith(f"error: {message}")
    assert _tree_bytes(top) == before


def test_symlink_destination_is_replaced_not_followed(hf_dir, tmp_path):
    """Replacing a `dst` that is a symlink to the source replaces the link; the source it points to stays."""
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    before = _tree_bytes(src)
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    dst = convert.convert_checkpoint(src, tmp_path / "link", overwrite=True)
    assert not dst.is_symlink() and (dst / "params.safetensors").is_file()
    assert _tree_bytes(src) == before


def _safetensors_cases() -> dict[str, tuple[dict, bytes, str]]:
    f32 = {"dtype": "F32", "shape": [1]}
    return {
        "metadata_str": ({"__metadata__": "x", "a": {**f32, "data_offsets": [0, 4]}}, b"\0" * 4,
                         r"__metadata__ must map strings to strings"),
        "metadata_int_value": ({"__metadata__": {"format": 1}, "a": {**f32, "data_offsets": [0, 4]}}, b"\0" * 4,
                               r"__metadata__ must map strings to strings"),
        "overlap": ({"a": {**f32, "data_offsets": [0, 4]}, "b": {**f32, "data_offsets": [0, 4]}}, b"\0" * 4,
                    r"tensor 'b' data_offsets \[0, 4\] overlap"),
        "gap": ({"a": {**f32, "data_offsets": [0, 4]}, "b": {**f32, "data_offsets": [8, 12]}}, b"\0" * 12,
                r"gap of 4 bytes before tensor 'b'"),
        "gap_at_start": ({"a": {**f32, "data_offsets": [4, 8]}}, b"\0" * 8, r"gap of 4 bytes before tensor 'a'"),
        "trailing_bytes": ({"a": {**f32, "data_offsets": [0, 4]}}, b"\0" * 8,
                           r"4 unexpected bytes after the last tensor 'a'"),
        "trailing_bytes_no_tensor": ({}, b"\0", r"1 unexpected bytes after the header"),
    }


@pytest.mark.parametrize("case", sorted(_safetensors_cases()))
def test_safetensors_layout_checked_like_the_reference(tmp_path, case):
    """What the safetensors library refuses, we refuse too, naming the file and the tensor."""
    from convert.safetensors_io import read_header

    header, data, message = _safetensors_cases()[case]
    file = tmp_path / "x.safetensors"
    _raw_safetensors(file, header, data)
    with pytest.raises(safetensors.SafetensorError):
        safetensors.numpy.load_file(file)
    with pytest.raises(CheckpointError, match=message) as info:
        read_header(file)
    assert str(file) in str(info.value)


def test_safetensors_layout_accepts_what_the_reference_accepts(tmp_path):
    from convert.safetensors_io import read_header

    file = tmp_path / "x.safetensors"
    f32 = {"dtype": "F32", "shape": [1]}
    # Listed out of offset order, a zero-size tensor, null metadata: all valid.
    header = {"__metadata__": None, "b": {**f32, "data_offsets": [4, 8]}, "a": {**f32, "data_offsets": [0, 4]},
              "empty": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}}
    _raw_safetensors(file, header, b"\0" * 8)
    assert sorted(safetensors.numpy.load_file(file)) == ["a", "b", "empty"]
    tensors, metadata = read_header(file)
    assert sorted(tensors) == ["a", "b", "empty"] and metadata == {}


def test_native_load_reports_bad_metadata(reference_params, tmp_path):
    dst = convert.save(reference_params, CONFIG, tmp_path / "ckpt")
    file = dst / "params.safetensors"
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header["__metadata__"] = "diffjax"
    _raw_safetensors(file, json.dumps(header).encode().ljust(length), raw[8 + length:])
    with pytest.raises(CheckpointError, match=r"params\.safetensors: .*__metadata__ must map strings to strings"):
        convert.load(dst)


def test_native_load_names_a_config_that_does_not_fit_its_weights_briefly(reference_params, tmp_path):
    """A config.json edited to another hidden size mismatches nearly every tensor: the error names the first
    few and counts the rest, instead of a line per tensor."""
    dst = convert.save(reference_params, CONFIG, tmp_path / "ckpt")
    config = json.loads((dst / "config.json").read_text())
    config["text_config"]["hidden_size"] *= 2
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatch with config\.json in \d+ tensors: .*\(and \d+ more\)") as info:
        convert.load(dst)
    assert len(str(info.value)) < 1000


def _with_leaf(params: dict, path: tuple[str, ...], value) -> dict:
    flat = flatten(params)
    flat[path] = value
    from convert.tree import unflatten

    return unflatten(flat)


def test_native_save_and_load_refuse_a_tensor_of_another_dtype(reference_params, tmp_path):
    """`save` refuses a tree of mixed floating dtypes (`load` would refuse what it wrote); a file that holds
    one anyway (written by other code) is refused by `load` unless a dtype is asked for."""
    from convert.safetensors_io import read_header, write_safetensors

    path = ("blocks", "layer_1", "mlp", "up_proj", "kernel")
    odd = _with_leaf(reference_params, path, np.asarray(flatten(reference_params)[path]).astype(np.float16))
    with pytest.raises(CheckpointError, match=r"params mix floating dtypes.*blocks/layer_1/mlp/up_proj/kernel is "
                                              r"float16, expected float32.*Cast them to one first"):
        convert.save(odd, CONFIG, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    dst = convert.save(reference_params, CONFIG, tmp_path / "ckpt")
    _, metadata = read_header(dst / convert.PARAMS_FILE)
    write_safetensors(dst / convert.PARAMS_FILE, {"/".join(p): leaf for p, leaf in flatten(odd).items()}, metadata)
    with pytest.raises(CheckpointError, match=r"blocks/layer_1/mlp/up_proj/kernel is float16, expected float32"):
        convert.load(dst)
    _, cast = convert.load(dst, dtype="float32")  # asking for one dtype casts everything: fine
    assert {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(cast)} == {np.dtype(np.float32)}


def test_hf_load_refuses_a_tensor_of_another_dtype(hf_dir, tmp_path):
    tensors = _tensors(hf_dir)
    name = DEC + "layers.2.self_attn.q_norm.weight"
    tensors[name] = tensors[name].astype(np.float16)
    folder = _variant(hf_dir, tmp_path / "f16", tensors)
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)} is float16, expected float32"):
        convert.load_hf(folder)
    with pytest.raises(CheckpointError, match="is float16, expected float32"):
        convert.convert_checkpoint(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _, params = convert.load_hf(folder, dtype="bfloat16")
    assert {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}


def test_dtype_check_allows_fp8_experts_and_their_scales(reference_params):
    """fp8 experts are float8_e4m3fn with float32 scales whatever the other weights' dtype: not a mix."""
    from convert.tree import check_tree, dtype_mismatches
    from diffjax.quantize import quantize_model

    bf16 = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), reference_params)
    fp8_config, quantized = quantize_model(CONFIG, bf16)
    flat = flatten(quantized)
    stored = [("/".join(p), p, np.dtype(leaf.dtype)) for p, leaf in flat.items()]
    assert {d for _, _, d in stored} == {np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn),
                                         np.dtype(np.float32)}
    assert dtype_mismatches(stored, fp8_config) == []
    check_tree(flat, fp8_config, "quantized", np.dtype(ml_dtypes.bfloat16))
    path = ("final_norm", "scale")
    odd = [(n, p, np.dtype(np.float32) if p == path else d) for n, p, d in stored]
    (line,) = dtype_mismatches(odd, fp8_config)
    assert line.startswith("final_norm/scale is float32, expected bfloat16 like ")


def test_convert_checks_the_destination_folder_before_reading(tmp_path, monkeypatch, capsys):
    """Both checks run before the (here missing) source is read: it would take minutes on a real one."""
    missing = tmp_path / "no-such-source"
    (tmp_path / "existing.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match=r"not a directory") as info:
        convert.convert_checkpoint(missing, tmp_path / "existing.json" / "new")
    assert info.value.filename == str(tmp_path / "existing.json")
    assert cli_main([str(missing), str(tmp_path / "existing.json" / "new"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'existing.json'}: not a directory (needed for {tmp_path / 'existing.json' / 'new'})\n"

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    # What a folder the user may not write to (or one like /proc, which refuses even root) does to a new entry.
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):
        if pathlib.Path(dir) == readonly:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    for dst in (readonly / "new", readonly / "deeper" / "new"):
        with pytest.raises(PermissionError, match="not a writable folder"):
            convert.convert_checkpoint(missing, dst)
        assert cli_main([str(missing), str(dst), "-q"]) == 1
        assert capsys.readouterr().err == (f"error: {readonly}: not a writable folder (needed for {dst}): "
                                           "Permission denied\n")
    assert list(readonly.iterdir()) == []


@pytest.mark.parametrize("failure", ["disk_full", "interrupt"])
def test_cli_os_error_and_interrupt_keep_old_destination(hf_dir, reference_params, tmp_path, monkeypatch, capsys,
                                                          failure):
    dst = convert.save(reference_params, CONFIG, tmp_path / "ckpt", {"max_new_tokens": 32})
    before = _tree_bytes(dst)
    real = convert.native.write_safetensors

    def half_then_fail(path, tensors, metadata=None, on_tensor=None):
        real(path, dict(list(tensors.items())[:3]), metadata, on_tensor)
        if failure == "disk_full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise KeyboardInterrupt

    monkeypatch.setattr(convert.native, "write_safetensors", half_then_fail)
    code = cli_main([str(hf_dir), str(dst), "--overwrite", "-q"])
    err = capsys.readouterr().err  # the log's "skipped 16 vision tensors", then the one error line
    assert "Traceback" not in err
    if failure == "disk_full":
        assert code == 1
        assert err.endswith(f"\nerror: No space left on device (converting {hf_dir} -> {dst})\n")
    else:
        assert code == 130
        assert err.endswith("\nerror: interrupted\n")
    assert _tree_bytes(dst) == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("size", ["abc", "-5", "0", "5XB"])
def test_cli_rejects_bad_max_shard_size(tmp_path, capsys, size):
    with pytest.raises(SystemExit) as info:
        cli_main([str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to-hf", f"--max-shard-size={size}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --max-shard-size: bad size {size!r}" in err and "5GB" in err and "Traceback" not in err


def test_parse_size():
    from convert.hf import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2 MiB") == 2 * 2**20 and parse_size(7) == 7
    for bad in ("abc", "-5", "0", "0.1B", 0, -3, True):
        with pytest.raises(ValueError, match="bad size"):
            parse_size(bad)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("t_min", "abc", "a number"),
    ("t_max", [1], "a number"),
    ("confidence_threshold", True, "a number"),
    ("max_new_tokens", 16.5, "an integer"),
    ("max_denoising_steps", "8", "an integer"),
    ("stability_threshold", [2], "an integer"),
    ("pad_token_id", "0", "an integer"),
    ("eos_token_id", "x", "an integer or a list of integers"),
    ("eos_token_id", [1, "x"], "an integer or a list of integers"),
    ("sampler_config", "entropy", "an object"),
    ("sampler_config", {"entropy_bound": "x"}, "a number"),
])
def test_generation_config_value_types(tmp_path, key, value, expected):
    file = tmp_path / "generation_config.json"
    file.write_text(json.dumps({"max_new_tokens": 16, key: value}))
    name = "sampler_config.entropy_bound" if isinstance(value, dict) else key
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(file))}: {re.escape(name)} must be {expected}, got"):
        convert.load_generation_config(tmp_path)


def test_generation_config_unknown_keys_warned_not_refused(tmp_path, caplog):
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "max_new_tokens": 16, "max_denoising_step": 3, "transformers_version": "5.23.0", "do_sample": True,
        "cache_implementation": "static",
    }))
    with caplog.at_level(logging.WARNING, logger="convert"):
        assert convert.load_generation_config(tmp_path) == {"max_new_tokens": 16}
    assert "'max_denoising_step' (did you mean 'max_denoising_steps'?)" in caplog.text
    assert "'do_sample'" in caplog.text
    assert "transformers_version" not in caplog.text and "cache_implementation" not in caplog.text


# Found by the third review: what a hand-edited or corrupt file could still slip through.


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [1.9], "data_offsets": [0, 4]},  # int() would read 1
    {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]},
    {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]},  # Infinity: int() raised OverflowError
], ids=["float", "bool", "string", "infinity"])
def test_safetensors_header_takes_json_integers_only(tmp_path, entry):
    from convert.safetensors_io import read_header

    header = json.dumps({"w": entry}).replace("1e+400", "Infinity").encode()
    _raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * 4)
    with pytest.raises(CheckpointError, match="bad header entry for tensor 'w'"):
        read_header(tmp_path / "bad.safetensors")


def test_index_and_json_files_that_lie_are_named(sharded_dir, reference_params, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(sharded_dir, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    for shard in (["x"], 5, "../model-00001-of-00002.safetensors", "/etc/passwd"):
        (folder / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": {
            **index["weight_map"], name: shard}}))
        with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(name)}' maps to .*, not a file name in"):
            convert.load_hf(folder)
    (folder / "model.safetensors.index.json").write_bytes(b"\xff{}")
    with pytest.raises(CheckpointError, match="bad index"):
        convert.load_hf(folder)
    (folder / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(CheckpointError, match=r"config\.json: bad JSON"):
        convert.load_hf(folder)

    # A diffjax checkpoint of a format version this code does not know.
    dst = convert.save(reference_params, CONFIG, tmp_path / "ckpt")
    file = dst / "params.safetensors"
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header["__metadata__"]["format_version"] = "2"
    _raw_safetensors(file, json.dumps(header).encode().ljust(length), raw[8 + length:])
    with pytest.raises(CheckpointError, match="format version '2', this diffjax reads version '1'"):
        convert.load(dst)


def test_a_destination_named_dot_is_the_folder_itself(reference_params, tmp_path, monkeypatch):
    """`.` has no name of its own: the temporary sibling would land inside it and the install fail at the end."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    convert.save(reference_params, CONFIG, ".", overwrite=True)
    assert (tmp_path / "here" / "params.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # no temporary left beside it
    _, params = convert.load(tmp_path / "here")
    jax.tree.map(np.testing.assert_array_equal, params, reference_params)


def test_leftovers_of_a_killed_write_are_named(reference_params, tmp_path, caplog):
    """SIGKILL runs no cleanup: the next write to the same destination says what was left beside it."""
    (tmp_path / ".ckpt.tmp-deadbeef").mkdir()
    with caplog.at_level(logging.WARNING, logger="convert"):
        convert.save(reference_params, CONFIG, tmp_path / "new" / "deeper" / "ckpt")
        convert.save(reference_params, CONFIG, tmp_path / "ckpt")
    assert [r.getMessage() for r in caplog.records if ".tmp-deadbeef" in r.getMessage()] == [
        f"left by an interrupted write to {tmp_path / 'ckpt'} (delete them if no other conversion is running): "
        f"{tmp_path / '.ckpt.tmp-deadbeef'}"]
    assert (tmp_path / ".ckpt.tmp-deadbeef").is_dir() and (tmp_path / "new" / "deeper" / "ckpt").is_dir()
