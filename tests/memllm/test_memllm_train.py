"""LoRA finetuning on MemLLM examples with a tiny random backbone: the loss falls, only LoRA moves, and a run
resumed from a checkpoint ends bitwise where the uninterrupted run ends."""
import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.backbones.model import init_params
from gmem_jax.errors import GmemError
from gmem_jax.memllm.data import build_examples
from gmem_jax.memllm.train import (LoraTrainConfig, encode_train_data, flatten_lora, lm_loss, load_lora, nest_lora,
                                   train_lora)
from gmem_jax.tasks.tokenizers import WordTokenizer
from gmem_jax.tasks.zsre import normalize_zsre_records

CFG = BackboneConfig(arch="llama", vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, intermediate_size=48, max_position_embeddings=64, norm_eps=1e-6,
                     tie_word_embeddings=False, eos_token_ids=(1,), pad_token_id=0)
SUBJECTS = ["Alder Ridge", "Brackwater", "Cindel Ford", "Dunmore Hall", "Eskan Bay", "Farrow Mill", "Glenhope",
            "Harlan Gate"]
ANSWERS = ["Oslo", "Lima", "Quito", "Perth", "Accra", "Hanoi", "Dakar", "Sofia"]


def records():
    raw = [{"subject": s, "src": f"Who founded {s}?", "rephrase": f"Who was the founder of {s}?", "alt": a,
            "loc": "nq question: who wrote the song", "loc_ans": "Paul Simon", "answers": ["x"]}
           for s, a in zip(SUBJECTS, ANSWERS, strict=True)]
    return normalize_zsre_records(raw, "synthetic")


@pytest.fixture(scope="module")
def setup():
    recs = records()
    texts = [t for ex in build_examples(recs) for t in (ex.prompt, ex.target)]
    tok = WordTokenizer.from_texts(texts, vocab_size=CFG.vocab_size)
    frozen = jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))
    # init_params' 0.02-scale head caps logits near +-0.6 (the final norm fixes |h|): a head 10x larger lets a
    # frozen model express confident predictions, as a pretrained one does.
    frozen["lm_head"]["kernel"] = 10.0 * frozen["lm_head"]["kernel"]
    return recs, tok, frozen


SETTINGS = LoraTrainConfig(rank=4, alpha=8.0, targets=("q", "v", "down"), steps=6, batch_size=8, max_len=40,
                           learning_rate=1e-1, warmup_steps=0, log_every=1, checkpoint_every=3)


def full_loss(lora, frozen, rows, alpha):
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return float(jax.jit(lm_loss, static_argnums=(3, 4))(lora, frozen, batch, CFG, alpha)[0])


def test_nest_and_flatten_are_inverse():
    flat = {"layers/attn/q/kernel": {"a": 1, "b": 2}, "layers/mlp/down/kernel": {"a": 3, "b": 4}}
    nested = nest_lora(flat)
    assert nested == {"layers": {"attn": {"q": {"kernel": {"a": 1, "b": 2}}},
                                 "mlp": {"down": {"kernel": {"a": 3, "b": 4}}}}}
    assert flatten_lora(nested) == flat


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """One 6-step run (checkpoints at steps 3 and 6), shared by the tests below."""
    recs, tok, frozen = setup
    workdir = tmp_path_factory.mktemp("lora_run")
    before = jax.tree.map(lambda x: np.array(x, copy=True), frozen)
    summary, lora = train_lora(CFG, frozen, tok, recs, workdir, SETTINGS, backbone_id="tiny")
    return workdir, before, summary, lora


def test_training_lowers_loss_and_touches_only_lora(setup, trained):
    recs, tok, frozen = setup
    workdir, before, summary, lora = trained
    rows = encode_train_data(recs, tok, SETTINGS, pad_id=0, eos_id=1)
    assert len(rows) == 4 * len(recs) == summary["train_examples"]  # write, 2 reads, locality per record
    # Untrained LoRA is the identity (b = 0): its loss is the frozen model's; training must lower it.
    init = nest_lora({k: {"a": v["a"], "b": np.zeros_like(v["b"])} for k, v in flatten_lora(lora).items()})
    loss0, loss1 = full_loss(init, frozen, rows, SETTINGS.alpha), full_loss(lora, frozen, rows, SETTINGS.alpha)
    assert loss0 > np.log(50) and loss1 < 0.9 * loss0, (loss0, loss1)
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(frozen), strict=True):  # frozen: bitwise unchanged
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), b.view(np.uint32))
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert logged[-1]["loss"] < logged[0]["loss"]
    # The export reads back as the trained tree, and refuses a different backbone.
    flat, config = load_lora(workdir / "lora", CFG)
    assert config["lora"]["targets"] == ["q", "v", "down"] and config["backbone_id"] == "tiny"
    for k, v in flatten_lora(lora).items():
        np.testing.assert_array_equal(flat[k]["a"], v["a"])
        np.testing.assert_array_equal(flat[k]["b"], v["b"])
    with pytest.raises(GmemError, match="fingerprint"):
        load_lora(workdir / "lora", CFG.replace(norm_eps=1e-5))


def test_resume_from_checkpoint_matches_uninterrupted_run(setup, trained, tmp_path):
    recs, tok, frozen = setup
    workdir, _, _, straight = trained
    shutil.copytree(workdir, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")  # as if the run had died after the step-3 checkpoint
    summary, resumed = train_lora(CFG, frozen, tok, recs, tmp_path / "b", SETTINGS, backbone_id="tiny")
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 6
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]  # the resumed log replaces the lines after the checkpoint
    with pytest.raises(GmemError, match="learning_rate"):
        train_lora(CFG, frozen, tok, recs, tmp_path / "b", dataclasses.replace(SETTINGS, learning_rate=1e-3),
                   backbone_id="tiny")
