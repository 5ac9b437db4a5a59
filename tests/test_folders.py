"""Folders as the writing libraries leave them: a transformers model folder (config.json beside the weights,
single file, shards, both .bin and .safetensors) and a PEFT adapter folder (adapter_config.json beside
adapter_model.safetensors or .bin). Every command takes the folder; the tensors read are the ones the
library's own loader reads, equal bit for bit; inspect shows the config and names the files read and
ignored."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import ckpttool
from clitools import assert_error, js, run

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _llama(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    m = _llama()
    m.save_pretrained(root / "model")
    m.save_pretrained(root / "sharded", max_shard_size="8KB")
    m.save_pretrained(root / "both")
    torch.save({k: v + 1 for k, v in m.state_dict().items()}, root / "both" / "pytorch_model.bin")
    _llama(dtype=torch.bfloat16).save_pretrained(root / "bf16")
    for seed, name in ((1, "adapter"), (2, "adapter2")):
        base = _llama()
        torch.manual_seed(seed)  # the adapter's own weights differ by seed, the base's do not
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        pm = peft.get_peft_model(base, cfg)
        pm.save_pretrained(root / name)
        if seed == 1:
            pm.save_pretrained(root / "adapter_bin", safe_serialization=False)
    return root


def _tensors(path):
    ckpt = ckpttool.open(path)
    sd = ckpttool.find_state_dict(ckpt)
    return {n: t.storage.source.read(*t.span()) for n, t in sd.tensors.items()}, ckpt


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.mark.parametrize("name", ["model", "sharded", "both", "bf16"])
def test_model_folder_tensors_are_what_from_pretrained_loads(folders, name):
    got, ckpt = _tensors(folders / name)
    loaded = transformers.LlamaForCausalLM.from_pretrained(folders / name, dtype="auto").state_dict()
    assert set(got) == set(loaded)
    for k, v in loaded.items():
        assert got[k] == _bytes(v), k
    assert ckpt.metadata["folder"]["kind"] == "transformers"


def test_inspect_shows_the_config_and_the_file_read(folders):
    r = run("inspect", folders / "bf16")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert "model       LlamaForCausalLM (model_type llama), config dtype bfloat16 (config.json)" in lines
    assert "read        model.safetensors" in lines
    assert not any(line.startswith("ignored") for line in lines)
    out = js("inspect", folders / "bf16")
    assert out["metadata"]["config"]["architectures"] == ["LlamaForCausalLM"]
    assert out["metadata"]["folder"] == {"path": str(folders / "bf16"), "kind": "transformers",
                                         "read": "model.safetensors", "ignored": []}


def test_both_bin_and_safetensors_reads_safetensors_and_names_the_bin_ignored(folders):
    r = run("inspect", folders / "both")
    assert r.exit_code == 0, r.output
    assert "ignored     pytorch_model.bin (model.safetensors is read first, as transformers loads)" \
        in r.stdout.splitlines()
    got, _ = _tensors(folders / "both")
    safe = ckpttool.open(folders / "both" / "model.safetensors")
    assert got == {n: t.storage.source.read(*t.span()) for n, t in safe.root.items()}


def test_sharded_folder_reads_the_index_and_ignores_no_shard(folders):
    out = js("inspect", folders / "sharded")
    assert out["format"] == "safetensors_sharded"
    assert out["metadata"]["folder"]["read"] == "model.safetensors.index.json"
    assert out["metadata"]["folder"]["ignored"] == []


def test_other_weight_files_in_a_model_folder_are_named_ignored(folders, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(folders / "model", d)
    torch.save({"lr": 0.1}, d / "training_args.bin")
    out = js("inspect", d)
    assert out["metadata"]["folder"]["ignored"] == [
        {"file": "training_args.bin", "why": "not a weight file the loader reads"}]


def test_malformed_config_is_a_note_and_the_weights_still_read(folders, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(folders / "model", d)
    (d / "config.json").write_text("{not json")
    r = run("inspect", d)
    assert r.exit_code == 0, r.output
    assert any(line.startswith("config      config.json is not valid JSON") for line in r.stdout.splitlines())
    (d / "config.json").write_text("[" * 100000 + "]" * 100000)  # deeper than json's recursion
    assert run("inspect", d).exit_code == 0


def test_model_folder_without_weights_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert_error(run("inspect", tmp_path), f"ckpttool: error: model folder has no model.safetensors, "
                                           f"pytorch_model.bin or shard index ({tmp_path})")
    (tmp_path / "config.json").unlink()
    (tmp_path / "adapter_config.json").write_text("{}")
    assert_error(run("diff", tmp_path, tmp_path), f"ckpttool: error: adapter folder has no "
                                                  f"adapter_model.safetensors or adapter_model.bin ({tmp_path})")


@pytest.mark.parametrize("name", ["adapter", "adapter_bin"])
def test_adapter_tensors_are_what_peft_loads(folders, name):
    from peft.utils import load_peft_weights
    got, ckpt = _tensors(folders / name)
    loaded = load_peft_weights(str(folders / name), device="cpu")
    assert set(got) == set(loaded) and got
    for k, v in loaded.items():
        assert got[k] == _bytes(v), k
    assert ckpt.metadata["adapter_config"]["r"] == 4


def test_inspect_shows_the_adapter_config_beside_its_tensors(folders):
    r = run("inspect", folders / "adapter")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert "adapter     LORA (r=4, alpha=8) (adapter_config.json)" in lines
    targets = next(line for line in lines if line.startswith("targets"))
    assert sorted(targets.split(None, 1)[1].split(", ")) == ["q_proj", "v_proj"]
    assert any("lora_A.weight" in line for line in lines)
    cfg = json.loads((folders / "adapter" / "adapter_config.json").read_text())
    out = js("inspect", folders / "adapter")
    assert out["metadata"]["adapter_config"]["peft_type"] == cfg["peft_type"] == "LORA"
    assert out["metadata"]["adapter_config"]["lora_alpha"] == cfg["lora_alpha"]


def test_diff_of_two_adapters(folders):
    same = js("diff", folders / "adapter", folders / "adapter_bin")
    assert same["equal"] is True and same["exact_equal"] == 8
    r = run("diff", folders / "adapter", folders / "adapter2")
    assert r.exit_code == 1, r.output
    assert r.stdout.splitlines()[-1] == "result: DIFFERENT"


def test_every_command_takes_the_adapter_folder(folders, tmp_path):
    out = tmp_path / "a.pt"
    assert run("convert", folders / "adapter", "-o", out).exit_code == 0
    from peft.utils import load_peft_weights
    loaded = load_peft_weights(str(folders / "adapter"), device="cpu")
    back = torch.load(out, weights_only=True)
    assert set(back) == set(loaded) and all(torch.equal(back[k], v) for k, v in loaded.items())
    assert run("scan", folders / "adapter_bin").exit_code == 0
    assert run("verify", folders / "adapter").exit_code == 0
    r = run("filter", folders / "adapter_bin", "--target", folders / "adapter", "-o", tmp_path / "f.safetensors")
    assert r.exit_code == 0, r.output
    r = run("remap", folders / "adapter_bin", "-o", tmp_path / "r.bin", "--map", "cpu=cuda")
    assert r.exit_code == 0, r.output
    assert {t.device for t in ckpttool.open(tmp_path / "r.bin").root.values()} == {"cuda"}
    assert_error(run("remap", folders / "adapter", "-o", tmp_path / "r2.bin", "--map", "cpu=cuda"),
                 f"ckpttool: error: remap rewrites torch.save and TorchScript files; this is safetensors, which "
                 f"carries no device tags ({folders / 'adapter'})")
    assert not os.path.exists(tmp_path / "r2.bin")


def test_single_file_before_shards_as_from_pretrained(folders, tmp_path):
    """transformers looks for model.safetensors before its index: a folder holding both (with other values in
    the shards) reads the single file, and names the index and its shards ignored."""
    d = tmp_path / "mixed"
    shutil.copytree(folders / "sharded", d)
    _llama(seed=5).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", d / "model.safetensors")
    got, _ = _tensors(d)
    loaded = transformers.LlamaForCausalLM.from_pretrained(d).state_dict()
    assert all(got[k] == _bytes(v) for k, v in loaded.items())
    folder = js("inspect", d)["metadata"]["folder"]
    assert folder["read"] == "model.safetensors"
    ignored = {i["file"] for i in folder["ignored"]}
    assert "model.safetensors.index.json" in ignored and any(n.startswith("model-0000") for n in ignored)


def test_config_transformers_weights_names_the_file_read(folders, tmp_path):
    d = tmp_path / "explicit"
    shutil.copytree(folders / "model", d)
    _llama(seed=6).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", d / "weights_v2.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "transformers_weights": "weights_v2.safetensors"}))
    got, ckpt = _tensors(d)
    loaded = transformers.LlamaForCausalLM.from_pretrained(d).state_dict()
    assert all(got[k] == _bytes(v) for k, v in loaded.items())
    assert ckpt.metadata["folder"]["read"] == "weights_v2.safetensors"
    (d / "config.json").write_text(json.dumps({**cfg, "transformers_weights": "../outside.safetensors"}))
    r = run("inspect", d)
    assert r.exit_code == 2 and "outside its folder" in r.stderr


def test_dcp_files_beside_a_config_are_ignored_as_from_pretrained_does(folders, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(folders / "model", d)
    (d / ".metadata").write_bytes(b"\x80\x04N.")
    (d / "__0_0.distcp").write_bytes(b"")
    folder = js("inspect", d)["metadata"]["folder"]
    assert folder["read"] == "model.safetensors"
    assert {i["file"] for i in folder["ignored"]} == {".metadata", "__0_0.distcp"}


def test_deeply_nested_adapter_config_is_shown_cut(folders, tmp_path):
    d = tmp_path / "a"
    shutil.copytree(folders / "adapter", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    deep = []
    for _ in range(900):
        deep = [deep]
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": deep}))
    r = run("inspect", d, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metadata"]["adapter_config"]["target_modules"] == [[["[1 items]"]]]


def test_verify_scans_the_file_the_folder_loads(folders, tmp_path):
    """verify of a model folder judges the weights from_pretrained reads: a pickle payload in a .bin the
    loader ignores (model.safetensors is read) does not fail the safetensors, and scan of the folder, which
    covers every file, still calls the folder dangerous."""
    d = tmp_path / "m"
    shutil.copytree(folders / "model", d)
    marker = tmp_path / "MARKER"
    cmd = f"touch {marker}".encode()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02cposix\nsystem\nq\x00X" + len(cmd).to_bytes(4, "little") + cmd
                                          + b"\x85R.")
    r = run("verify", d)
    assert r.exit_code == 0, r.output
    assert run("scan", d).exit_code == 1
    assert not marker.exists()


def test_diff_of_adapters_whose_configs_differ_is_different(folders, tmp_path):
    """Same tensors, lora_alpha 8 vs 16: the update is twice as large, so the adapters differ."""
    d = tmp_path / "alpha"
    shutil.copytree(folders / "adapter", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 16}))
    r = run("diff", folders / "adapter", d)
    assert r.exit_code == 1, r.output
    assert "adapter configs DIFFER: lora_alpha 8 vs 16" in r.stdout
    assert r.stdout.splitlines()[-1] == "result: DIFFERENT"
