"""`tprl train llm`: a tiny random LLaVA's language model fine-tuned on pruned inputs (LoRA via peft and
full), on Ray Train workers, resumed, saved with save_pretrained and loaded back for evaluation."""

import json

import mlflow
import pyarrow.parquet as pq
import pytest
import ray
import torch

from tprl_ray.backbones.base import BackboneError
from tprl_ray.backbones.load import load_backbone
from tprl_ray.config import EMBEDDED_LFD, BackboneConfig
from tprl_ray.models.tiny_llava import TinyLlavaSize, build_model, build_processor
from tprl_ray.pipeline.config import PipelineConfig
from tprl_ray.precompute.schema import padded_tokens
from tprl_ray.training.config import LlmConfig, LoraSettings
from tprl_ray.training.llm import train_llm


@pytest.fixture(scope="module")
def random_llava(tmp_path_factory):
    """A random LLaVA of the shipped model's sizes (so the shared precompute's features fit it)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random-llava")
    processor = build_processor(TinyLlavaSize())
    build_model(TinyLlavaSize(), processor.tokenizer).save_pretrained(path)
    processor.save_pretrained(path)
    yield path
    ray.shutdown()


def config(precomputed, random_llava, out, **fields) -> LlmConfig:
    return LlmConfig(
        data=precomputed / "train",
        val_data=precomputed / "val",
        out=out,
        backbone=BackboneConfig(path=str(random_llava)),
        policy=EMBEDDED_LFD,
        pruner="lfd",
        lr=1e-2,
        batch_size=8,
        workers=2,
        ray_address="local",
        **fields,
    )


def scores(backbone, precomputed, n=12):
    table = pq.read_table(next((precomputed / "val" / "shards").glob("*.parquet")))[:n]
    features = torch.from_numpy(padded_tokens(table["features"])[0]).float()
    keep = [torch.arange(0, 64, 4)] * n  # 16 of the 64 tokens
    logp, _ = backbone.score(
        table["question"].to_pylist(), table["answer"].to_pylist(), backbone.project(features), keep
    )
    return logp


def test_lora_fine_tune_trains_resumes_saves_and_the_adapter_loads_for_evaluation(
    precomputed, random_llava, digits_dir, tmp_path
):
    from tprl_ray.evaluation.config import EvalConfig
    from tprl_ray.evaluation.engine import run_eval

    cfg = config(precomputed, random_llava, tmp_path / "llm", epochs=1, merge=True, lora=LoraSettings(rank=4))
    first = train_llm(cfg)
    resumed = train_llm(cfg.model_copy(update={"epochs": 3}))
    assert first["epochs"] == 1 and resumed["epochs"] == 3
    assert resumed["train_loss"] < first["train_loss"] and resumed["val_loss"] < first["val_loss"]
    adapter = tmp_path / "llm" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert "language_model" in json.loads((adapter / "adapter_config.json").read_text())["target_modules"]

    base = load_backbone(BackboneConfig(path=str(random_llava), device="cpu"))
    tuned = load_backbone(BackboneConfig(path=str(random_llava), adapter=adapter, device="cpu"))
    merged = load_backbone(BackboneConfig(path=str(tmp_path / "llm" / "merged"), device="cpu"))
    before, after = scores(base, precomputed), scores(tuned, precomputed)
    assert (after - before).abs().max() > 0.05  # the adapter changes the model
    torch.testing.assert_close(scores(merged, precomputed), after, atol=1e-4, rtol=1e-4)

    report = run_eval(
        EvalConfig(
            backbone=BackboneConfig(path=str(random_llava), adapter=adapter),
            data=digits_dir / "test",
            pruners=["lfd"],
            budgets=[0.25],
            limit=8,
            out=tmp_path / "eval" / "report.json",
            ray_address="local",
        )
    )
    assert [r["label"] for r in report["rows"]] == ["none_100", "lfd_25"] and report["rows"][1]["avg_tokens"] == 16

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'llm' / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'tprl-llm'")
    assert len(versions) == 2 and {v.tags["method"] for v in versions} == {"lora"}
    assert client.get_run(versions[0].run_id).data.metrics["train_loss"] == pytest.approx(resumed["train_loss"])
    stamp = (adapter / "adapter_model.safetensors").stat().st_mtime_ns
    assert train_llm(cfg.model_copy(update={"epochs": 3})) == resumed  # finished: neither exported nor registered again
    assert (adapter / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert len(client.search_model_versions("name = 'tprl-llm'")) == 2

    with pytest.raises(ValueError, match="trained with other lr"):
        train_llm(cfg.model_copy(update={"epochs": 4, "lr": 1e-3}))


def test_full_fine_tune_saves_a_checkpoint_with_the_embeddings_frozen(precomputed, random_llava, tmp_path):
    cfg = config(precomputed, random_llava, tmp_path / "llm", epochs=1, method="full", gradient_checkpointing=True)
    result = train_llm(cfg)
    model_dir = tmp_path / "llm" / "model"
    assert result["saved"] == [str(model_dir)] and not (tmp_path / "llm" / "adapter").exists()
    card = json.loads((model_dir / "tprl_model_card.json").read_text())
    assert card["finetuned"]["method"] == "full" and card["prompt_format"] == "vicuna_v1"
    base = load_backbone(BackboneConfig(path=str(random_llava), device="cpu"))
    tuned = load_backbone(BackboneConfig(path=str(model_dir), device="cpu"))
    same = {n: torch.equal(p, dict(base.model.named_parameters())[n]) for n, p in tuned.model.named_parameters()}
    assert same["model.language_model.embed_tokens.weight"] and same["model.multi_modal_projector.linear_1.weight"]
    assert not same["model.language_model.layers.0.self_attn.q_proj.weight"]
    # the query embeddings the pruner reads stay the frozen model's
    torch.testing.assert_close(tuned.query_embedding("is there a 7 ?"), base.query_embedding("is there a 7 ?"))


def test_models_and_targets_it_cannot_fine_tune_are_refused_before_ray(precomputed, random_llava, tmp_path):
    ray.shutdown()
    with pytest.raises(ValueError, match=r"lora.target_modules \['qkv'\] name no layer"):
        train_llm(config(precomputed, random_llava, tmp_path / "a", lora=LoraSettings(target_modules=["qkv"])))
    with pytest.raises(FileNotFoundError, match="policy directory not found"):
        train_llm(config(precomputed, random_llava, tmp_path / "b").model_copy(update={"policy": tmp_path / "none"}))
    with pytest.raises(ValueError, match=r"budget_range \[0.4, 0.1\] must be \[low, high\]"):
        config(precomputed, random_llava, tmp_path / "c", budget_range=[0.4, 0.1])
    with pytest.raises(BackboneError, match="not a LoRA adapter directory"):
        load_backbone(BackboneConfig(path=str(random_llava), adapter=tmp_path, device="cpu"))
    half = BackboneConfig(path=str(random_llava), dtype="float16")
    with pytest.raises(ValueError, match="method full trains the weights themselves"):
        train_llm(
            config(precomputed, random_llava, tmp_path / "d", method="full").model_copy(update={"backbone": half})
        )
    with pytest.raises(ValueError, match="finetune needs policy: train"):
        PipelineConfig(finetune=True, policy="shipped")
    assert not ray.is_initialized()
