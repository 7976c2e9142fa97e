"""Several devices: which mesh the engine picks, how every parameter and cache buffer is split on it,
and that a sharded engine generates exactly what an unsharded one does.

The split rules are checked here on abstract meshes (no devices needed). Generation runs in a fresh
process with forced host devices (tests/sharded_checks.py), because JAX fixes its device count when
it starts; the sharded and the unsharded engines there share one process and one set of weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from nbchat.engine import model, sharding
from nbchat.errors import InvalidRequestError
from tests.tiny_model import TINY_ENGINE_CONFIG

REPO = Path(__file__).resolve().parent.parent
# SmolLM2-135M's shapes with two layers: 9 query heads, 3 kv heads, MLP 1536, vocab 49152.
SMOLLM2_SHAPES = dataclasses.replace(
    TINY_ENGINE_CONFIG, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_heads=9,
    num_kv_heads=3, head_dim=64,
)
SMOLLM2_FORMATS = {"embed": "Q8_0"} | {
    f"layers.{i}.{name}": "Q4_1" for i in range(2)
    for name in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
}


def flat_specs(config, formats, mesh) -> dict[str, PartitionSpec]:
    state = nnx.state(nnx.eval_shape(lambda: model.Decoder(config, formats=formats, rngs=nnx.Rngs(0))))
    specs = sharding.parameter_specs(state, config, mesh)
    return {".".join(sharding._names(path)): spec
            for path, spec in jax.tree_util.tree_flatten_with_path(
                specs, is_leaf=lambda node: isinstance(node, PartitionSpec))[0]}


def test_smollm2_on_two_devices_splits_its_mlp_and_replicates_its_three_kv_heads_and_vocabulary():
    specs = flat_specs(SMOLLM2_SHAPES, SMOLLM2_FORMATS, AbstractMesh((2,), ("model",)))
    for leaf in ("codes", "scale", "minimum"):
        assert specs[f"layers.0.mlp.gate.{leaf}"] == PartitionSpec("model", None)
        assert specs[f"layers.1.mlp.up.{leaf}"] == PartitionSpec("model", None)
        assert specs[f"layers.0.mlp.down.{leaf}"] == PartitionSpec(None, "model")
        for name in ("q", "k", "v", "o"):
            assert specs[f"layers.0.attn.{name}.{leaf}"] == PartitionSpec()
    assert specs["embed.codes"] == specs["embed.scale"] == PartitionSpec()
    assert specs["final_norm.weight"] == specs["layers.0.attn_norm.weight"] == PartitionSpec()
    cache = sharding.cache_specs(SMOLLM2_SHAPES, AbstractMesh((2,), ("model",)), batch_size=4)
    assert set(cache.k + cache.v) == {PartitionSpec(None, None, None, None)}


def test_a_packed_matrix_splits_whole_or_not_at_all():
    # MLP 96 on 4 devices: gate/up's 12 word rows split; down's 96 columns would, its 3 blocks of
    # 32 (one scale each) would not, so none of its leaves split. Its float form does split.
    config = dataclasses.replace(TINY_ENGINE_CONFIG, intermediate_size=96, num_heads=8, num_kv_heads=4)
    mesh = AbstractMesh((4,), ("model",))
    packed = flat_specs(config, {"layers.0.mlp.gate": "Q4_1", "layers.0.mlp.down": "Q4_1"}, mesh)
    gate_codes, gate_scale = packed["layers.0.mlp.gate.codes"], packed["layers.0.mlp.gate.scale"]
    assert gate_codes == gate_scale == PartitionSpec("model", None)
    down = {packed[f"layers.0.mlp.down.{leaf}"] for leaf in ("codes", "scale", "minimum")}
    assert down == {PartitionSpec()}
    assert flat_specs(config, {}, mesh)["layers.0.mlp.down.weight"] == PartitionSpec(None, "model")
    # 4 kv heads on 4 devices: attention and the cache's kv-head axis split, biases with their rows.
    biased = dataclasses.replace(config, attention_bias=True)
    specs = flat_specs(biased, {}, mesh)
    assert specs["layers.0.attn.q.bias"] == PartitionSpec("model")
    assert specs["layers.0.attn.o.weight"] == PartitionSpec(None, "model")


def test_data_axis_splits_cache_rows_only_where_it_divides_them():
    mesh = AbstractMesh((2, 2), ("data", "model"))
    wide = dataclasses.replace(TINY_ENGINE_CONFIG, num_heads=8, num_kv_heads=4)
    assert sharding.cache_specs(wide, mesh, batch_size=4).k[0] == PartitionSpec("data", "model", None, None)
    assert sharding.cache_specs(wide, mesh, batch_size=1).v[1] == PartitionSpec(None, "model", None, None)
    assert flat_specs(wide, {}, AbstractMesh((2,), ("data",)))["layers.0.mlp.gate.weight"] == PartitionSpec()


def test_mesh_specs_are_read_or_refused_with_the_field_and_the_fix():
    assert sharding.parse_mesh_spec("model=2") == {"model": 2}
    assert sharding.parse_mesh_spec(" model=2, data=4 ") == {"data": 4, "model": 2}  # grid order
    assert sharding.parse_mesh_spec("none") == sharding.parse_mesh_spec("1") == {}
    for bad in ("model", "model=0", "tensor=2", "model=2,model=2", "model=two"):
        with pytest.raises(InvalidRequestError, match=r"^NBCHAT_MESH: cannot read .*'model=2'") as raised:
            sharding.parse_mesh_spec(bad, sharding.ENV_VAR)
        assert raised.value.param == "NBCHAT_MESH"
    # This process has one device.
    with pytest.raises(InvalidRequestError, match="needs 2 devices but 1 are present") as raised:
        sharding.choose_mesh("model=2")
    assert raised.value.param == "mesh"
    assert sharding.choose_mesh() is None and sharding.choose_mesh("model=1") is None


def test_one_device_builds_no_mesh(tiny_model_dir, monkeypatch):
    from nbchat import Engine

    monkeypatch.delenv(sharding.ENV_VAR, raising=False)
    engine = Engine(str(tiny_model_dir)).load()
    assert engine.mesh is None and "mesh" not in repr(engine) and "mesh" not in engine.model_info.device


def run_checks(devices: int, model_dir: str, cases: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop(sharding.ENV_VAR, None)
    done = subprocess.run([sys.executable, "-m", "tests.sharded_checks", model_dir, cases], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def assert_same_generation(case: dict) -> None:
    assert case["tokens_equal"]
    assert case["logprob_gap"] < 1e-4


def test_two_devices_generate_the_unsharded_tokens(tiny_model_dir):
    results = run_checks(2, str(tiny_model_dir), "wide-packed-grown,odd-packed")
    assert results["devices"] == 2 and results["mesh"] == "model=2"
    wide, odd = results["generator"]["wide-packed-grown"], results["generator"]["odd-packed"]
    for case in (wide, odd):
        assert_same_generation(case)
    # The wide model splits everywhere; the cache grew past 256 slots and kept its kv-head split,
    # also with two rows (two threads at once, each getting its tokens alone).
    assert wide["specs"]["layers.0.attn.q.codes"] == ["model", None]
    down, o = wide["specs"]["layers.0.mlp.down.codes"], wide["specs"]["layers.0.attn.o.scale"]
    assert o == down == [None, "model"]
    assert wide["capacity"] > 256 and wide["cache_spec"] == [None, "model", None, None]
    assert wide["batched"] == {"equal": True, "batch_size": 2, "cache_spec": [None, "model", None, None]}
    # 3 kv heads: attention and cache replicated; the MLP's gate still split.
    assert odd["specs"]["layers.0.attn.q.codes"] == odd["specs"]["layers.0.attn.o.codes"] == [None, None]
    assert odd["cache_spec"] == [None, None, None, None]
    assert odd["specs"]["layers.0.mlp.gate.codes"] == ["model", None]

    engine = results["engine"]  # the tiny Hugging Face model, float weights, through the chat API
    assert engine["tokens_equal"] and engine["reply_tokens"] > 0 and engine["logprob_gap"] < 1e-4
    assert engine["threads_equal"]
    assert engine["top_ids_equal"] and engine["top_logprob_gap"] < 1e-4
    assert (engine["mesh"], engine["plain_mesh"]) == ("model=2", "none")
    assert engine["repr"].endswith("loaded, mesh model=2)") and engine["device"] == "2 x cpu, mesh model=2"
    for key, param in (("arg_error", "mesh"), ("arg_type_error", "mesh"), ("env_error", "NBCHAT_MESH"),
                       ("env_syntax_error", "NBCHAT_MESH")):
        assert engine[key]["type"] == "InvalidRequestError" and engine[key]["param"] == param
        assert engine[key]["message"].startswith(f"{param}: ")
    assert "needs 1000 devices but 2 are present" in engine["env_error"]["message"]


def test_four_devices_generate_the_unsharded_tokens():
    results = run_checks(4, "-", "wide-packed,odd-float")
    assert results["devices"] == 4 and results["mesh"] == "model=4"
    wide, odd = results["generator"]["wide-packed"], results["generator"]["odd-float"]
    for case in (wide, odd):
        assert_same_generation(case)
    assert wide["specs"]["layers.0.attn.q.scale"] == ["model", None] and wide["cache_spec"][1] == "model"
    # An MLP of 96 in float: split (96 / 4); 3 kv heads: replicated.
    assert odd["specs"]["layers.0.mlp.down.weight"] == [None, "model"]
    assert odd["specs"]["layers.0.attn.q.weight"] == [None, None] and odd["cache_spec"][1] is None


@pytest.mark.integration
def test_smollm2_on_two_devices_generates_its_unsharded_tokens():
    smollm2 = run_checks(2, "-", "smollm2")["generator"]["smollm2"]
    assert smollm2["tokens_equal"] and smollm2["logprob_gap"] < 1e-3
    assert smollm2["specs"]["layers.0.mlp.gate.codes"] == ["model", None]
    assert smollm2["specs"]["layers.0.attn.q.codes"] == [None, None]  # 3 kv heads
    assert smollm2["cache_spec"] == [None, None, None, None]
