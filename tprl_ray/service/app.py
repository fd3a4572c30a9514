"""`tprl serve`: the pruned model behind an OpenAI-compatible Ray Serve application.

Three deployments, each scaled on its own (``ingress``, ``vision``, ``llm`` in :class:`ServeConfig`):

    HTTP -> Ingress (FastAPI: checks, image decoding) -> VisionPruner (@serve.batch: vision encoder,
            query embedding, pruner) -> LanguageModel (hf: @serve.batch greedy decoding; vllm: the
            engine's continuous batching) -> OpenAI ``chat.completion`` with ``usage.visual_tokens``

Handles carry each request's kept post-projector tokens (``[k, d_llm]``) and their original indices;
an in-LLM pruner (FastV, SparseVLM) gets every token and prunes inside the ``hf`` language model.
A refused request is a 4xx OpenAI error object; the replicas keep serving.

Metrics (``ray.util.metrics``, exported as ``ray_tprl_serve_*``; ``dashboards/serve.json``): requests
by status code, request latency, time to first token, visual tokens kept, batch sizes per deployment.
"""

import asyncio
import signal
import time
from collections import defaultdict

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from tprl_ray.config import first_error
from tprl_ray.service.api import RequestError, check_budget, completion, parse_body, parse_request
from tprl_ray.service.config import DeploymentConfig, ServeConfig

LATENCY_BOUNDS = [0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30]
BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64]

http = FastAPI(title="tprl serve", docs_url=None, redoc_url=None)


def batch_metric():
    from ray.util import metrics

    return metrics.Histogram(
        "tprl_serve_batch_size", "requests per batch", boundaries=BATCH_BOUNDS, tag_keys=("deployment",)
    )


def each_alone(run, items: list) -> list:
    """``run(items)``; if the batch fails, each item alone, so that one bad item fails only its own
    request (its result is the exception)."""
    try:
        return run(items)
    except Exception:
        out = []
        for item in items:
            try:
                out.append(run([item])[0])
            except Exception as exc:
                out.append(exc)
        return out


def unwrap(result):
    """A result of :func:`each_alone`: raised if it is an exception; a model's refusal (ValueError) as a 400."""
    if isinstance(result, ValueError):
        raise RequestError(400, f"the model cannot take this request ({str(result).splitlines()[0]})")
    if isinstance(result, Exception):
        raise result
    return result


def load_pruner(cfg: ServeConfig):
    """The configured pruner; a learned one's policy from a directory or an MLflow model URI."""
    from tprl_ray.pruners.registry import build_pruner

    policy = cfg.policy
    if policy is not None and policy.startswith(("models:/", "runs:/")):
        import mlflow

        from tprl_ray.pruners.pyfunc import pruner_directory
        from tprl_ray.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri(".", cfg.mlflow_uri))
        policy = pruner_directory(policy)
    pruner = build_pruner(cfg.pruner, cfg.seed, policy)
    if cfg.tau is not None:
        pruner.threshold = cfg.tau
    return pruner


@serve.deployment(name="VisionPruner")
class VisionPruner:
    """The vision encoder, the query embedding and the pruner, batched over requests."""

    def __init__(self, cfg: dict):
        from tprl_ray.backbones.load import load_hf
        from tprl_ray.pruners.inllm import InLlmPruner

        self.cfg = ServeConfig.model_validate(cfg)
        torch.set_num_threads(self.cfg.vision.threads)
        self.backbone = load_hf(self.cfg.served_backbone().model_copy(update={"backend": "hf"}))
        self.pruner = load_pruner(self.cfg)
        self.in_llm = isinstance(self.pruner, InLlmPruner)
        self._batched.set_max_batch_size(self.cfg.vision.pool.batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.vision.batch_wait_s)
        self.m_batch = batch_metric()

    def prune_many(self, items: list[tuple[np.ndarray, str, float | int]]) -> list[dict]:
        """Encode every image once, then prune each request at its budget."""
        from PIL import Image

        from tprl_ray.pruners.base import PruneBatch

        batch = PruneBatch.encode(
            self.backbone,
            [Image.fromarray(pixels) for pixels, _, _ in items],
            list(range(len(items))),
            [question for _, question, _ in items],
            [str(i) for i in range(len(items))],
            self.pruner.needs_attention and not self.in_llm,
            self.pruner.needs_query and not self.in_llm,
        )
        by_budget = defaultdict(list)
        for i, (_, _, budget) in enumerate(items):
            by_budget[budget].append(i)
        out: list[dict] = [{}] * len(items)
        for budget, index in by_budget.items():
            sub = batch.take(index)
            if self.in_llm:
                keep = [torch.arange(t.shape[0]) for t in sub.tokens]
                tokens = sub.tokens
            else:
                pruning = self.pruner.prune(sub, budget)
                keep, tokens = pruning.keep, pruning.tokens
            for j, i in enumerate(index):
                out[i] = {
                    "tokens": tokens[j][keep[j]].cpu(),
                    "keep": keep[j].cpu(),
                    "grid": tuple(sub.grids[j]),
                    "total": int(sub.tokens[j].shape[0]),
                }
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list[tuple[np.ndarray, str, float | int]]) -> list[dict]:
        self.m_batch.observe(len(items), tags={"deployment": "vision"})
        return await asyncio.to_thread(each_alone, self.prune_many, items)

    async def prune(self, pixels: np.ndarray, question: str, budget: float | int) -> dict:
        """The kept post-projector tokens of one request (``tokens`` ``[k, d_llm]``, original ``keep``
        indices, ``grid``, ``total`` tokens of the image)."""
        return unwrap(await self._batched((pixels, question, budget)))


@serve.deployment(name="LanguageModel")
class LanguageModel:
    """The language model: greedy answers from kept visual tokens (``hf``: batched over requests)."""

    def __init__(self, cfg: dict):
        from tprl_ray.backbones.load import load_backbone
        from tprl_ray.pruners.inllm import InLlmPruner
        from tprl_ray.pruners.registry import pruner_class

        self.cfg = ServeConfig.model_validate(cfg)
        torch.set_num_threads(self.cfg.llm.threads)
        self.backbone = load_backbone(self.cfg.served_backbone())
        if self.cfg.backbone.backend == "vllm":
            _ = self.backbone.async_engine  # start the engine now, not on the first request
        in_llm = issubclass(pruner_class(self.cfg.pruner), InLlmPruner)  # only those prune in this replica
        self.in_llm = load_pruner(self.cfg) if in_llm else None
        self._batched.set_max_batch_size(self.cfg.llm.pool.batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.llm.batch_wait_s)
        self.m_batch = batch_metric()

    def generate_many(self, items: list[dict]) -> list[dict]:
        """Greedy token ids per request, one batched decode per (max_tokens, budget) group."""
        from tprl_ray.pruners.base import PruneBatch

        groups = defaultdict(list)
        for i, item in enumerate(items):
            groups[(item["max_tokens"], item["budget"])].append(i)
        out: list[dict] = [{}] * len(items)
        for (max_tokens, budget), index in groups.items():
            questions = [items[i]["question"] for i in index]
            grids = [items[i]["grid"] for i in index]
            full = []
            for i in index:  # kept tokens back at their original indices (Qwen2.5-VL's positions need them)
                tokens = torch.zeros(items[i]["total"], items[i]["tokens"].shape[1], dtype=items[i]["tokens"].dtype)
                tokens[items[i]["keep"]] = items[i]["tokens"]
                full.append(tokens.to(self.backbone.device))
            first = []
            if self.in_llm is not None:  # staged decoding: its first token counts as the answer's end
                batch = PruneBatch(full, full, None, grids, [str(i) for i in index], questions)
                ids, seen = self.in_llm.generate_ids(self.backbone, batch, budget, max_tokens)
            else:
                keep = [items[i]["keep"] for i in index]
                ids = self.backbone.generate_ids(
                    questions,
                    full,
                    keep,
                    grids,
                    max_tokens,
                    on_first=lambda first=first: first.append(time.perf_counter()),
                )
                seen = [float(len(k)) for k in keep]
            at = first[0] if first else time.perf_counter()
            for j, i in enumerate(index):
                out[i] = {"ids": ids[j], "visual_tokens": seen[j], "first_token": at}
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list[dict]) -> list[dict]:
        self.m_batch.observe(len(items), tags={"deployment": "llm"})
        return await asyncio.to_thread(each_alone, self.generate_many, items)

    async def generate(self, item: dict) -> dict:
        """``item``: question, kept ``tokens``, ``keep``, ``grid``, ``total``, ``max_tokens``, ``budget``.
        Returns the answer, whether it finished, prompt and completion token counts, visual tokens seen and
        the seconds from arrival here to the first answer token."""
        arrived = time.perf_counter()
        if self.cfg.backbone.backend == "vllm":
            result = await self.backbone.generate_async(item["question"], item["tokens"], item["max_tokens"])
        else:
            result = unwrap(await self._batched(item))
        ids, end = result["ids"], self.backbone.end_id
        return {
            "text": self.backbone.decode([ids])[0],
            "finished": end in ids,
            "prompt_tokens": self.backbone.text_tokens(item["question"]) + int(item["tokens"].shape[0]),
            "completion_tokens": len(ids),
            "visual_tokens": round(result["visual_tokens"]) if "visual_tokens" in result else len(item["keep"]),
            "first_token_s": result["first_token"] - arrived,
        }


@serve.deployment(name="Ingress")
@serve.ingress(http)
class Ingress:
    """The HTTP front: OpenAI routes, request checks, image decoding; errors as OpenAI error objects."""

    def __init__(self, cfg: dict, vision, llm):
        from ray.util import metrics

        from tprl_ray.backbones.inputs import ModelInputs

        self.cfg = ServeConfig.model_validate(cfg)
        self.inputs = ModelInputs.load(self.cfg.served_backbone())
        self.vision, self.llm = vision, llm
        self.created = int(time.time())
        self.m_requests = metrics.Counter("tprl_serve_requests", "chat requests by HTTP status", tag_keys=("code",))
        self.m_latency = metrics.Histogram(
            "tprl_serve_request_latency_s", "seconds per answered chat request", boundaries=LATENCY_BOUNDS
        )
        self.m_first = metrics.Histogram(
            "tprl_serve_time_to_first_token_s",
            "seconds from arrival to the first answer token",
            boundaries=LATENCY_BOUNDS,
        )
        self.m_kept = metrics.Histogram(
            "tprl_serve_visual_tokens",
            "visual tokens the LLM saw per request",
            boundaries=[1, 8, 16, 32, 64, 144, 192, 576, 2048],
        )
        self.m_kept_fraction = metrics.Histogram(
            "tprl_serve_kept_fraction",
            "visual tokens kept over the image's",
            boundaries=[0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1],
        )

    @http.get("/health")
    def health(self) -> dict:
        return {"status": "ok"}

    @http.get("/v1/models")
    def models(self) -> dict:
        name = self.cfg.served_name()
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": self.created, "owned_by": "tprl"}],
        }

    @http.post("/v1/chat/completions")
    async def chat(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            query = await asyncio.to_thread(self.query, await self.body(request))
            kept = await self.vision.prune.remote(query.pixels, query.question, query.budget)
            at_llm = time.perf_counter()
            answer = await self.llm.generate.remote(
                {"question": query.question, "max_tokens": query.max_tokens, "budget": query.budget, **kept}
            )
        except RequestError as exc:
            return self.refuse(exc)
        except Exception as exc:  # a replica died, Serve's back-pressure, a bug: still one JSON line
            reason = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            return self.refuse(RequestError(500, f"internal error ({type(exc).__name__}: {reason})", "internal_error"))
        body = completion(
            self.cfg.served_name(),
            answer["text"],
            answer["finished"],
            answer["prompt_tokens"],
            answer["completion_tokens"],
            answer["visual_tokens"],
            kept["total"],
        )
        self.m_requests.inc(tags={"code": "200"})
        self.m_latency.observe(time.perf_counter() - start)
        self.m_first.observe(at_llm - start + answer["first_token_s"])
        self.m_kept.observe(answer["visual_tokens"])
        self.m_kept_fraction.observe(answer["visual_tokens"] / kept["total"])
        return JSONResponse(body)

    def refuse(self, exc: RequestError) -> JSONResponse:
        self.m_requests.inc(tags={"code": str(exc.status)})
        return JSONResponse(exc.body(), status_code=exc.status)

    async def body(self, request: Request) -> bytes:
        """The request body, read no further than the size limit (declared or chunked)."""
        limit = self.cfg.max_body_bytes
        declared = int(request.headers.get("content-length") or 0)
        if declared > limit:
            raise RequestError(413, f"request body of {declared} bytes is above the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body is above the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def query(self, raw: bytes):
        """The checked request: body, fields, question length (before the image is decoded), image."""

        def check_question(question: str, max_tokens: int) -> None:
            n, cap = self.inputs.question_tokens(question), self.inputs.question_cap(self.cfg.backbone, max_tokens)
            if n > cap:
                raise RequestError(
                    400, f"the question has {n} tokens, above the {cap} that fit beside the image and answer"
                )

        return parse_request(parse_body(raw, self.cfg), self.cfg, self.inputs.visual_tokens, check_question)


def deployment_options(part: DeploymentConfig, gpus: float, runtime_env: dict | None = None) -> dict:
    """Serve options of one deployment: replicas or autoscaling, resources per replica."""
    actor = {"num_cpus": part.pool.cpus, "num_gpus": gpus}
    if runtime_env:
        actor["runtime_env"] = runtime_env
    scale = {"autoscaling_config": part.autoscaling} if part.autoscaling else {"num_replicas": part.pool.size}
    return {**scale, "max_ongoing_requests": part.max_ongoing_requests, "ray_actor_options": actor}


def build_app(cfg: ServeConfig):
    """The bound application (also what ``pipelines/serve.py`` gives ``serve run`` / ``serve deploy``);
    the MLflow store is resolved here, in the driver's directory, not in each replica's."""
    from tprl_ray.ray_setup import gpus_per_actor
    from tprl_ray.tracking import tracking_uri

    config = cfg.model_copy(update={"mlflow_uri": tracking_uri(".", cfg.mlflow_uri)}).model_dump(mode="json")
    vllm = cfg.backbone.backend == "vllm"
    vision = VisionPruner.options(**deployment_options(cfg.vision, gpus_per_actor(cfg.vision.pool.gpus))).bind(config)
    llm = LanguageModel.options(
        **deployment_options(
            cfg.llm, gpus_per_actor(cfg.llm.pool.gpus), cfg.backbone.vllm.runtime_env if vllm else None
        )
    ).bind(config)
    return Ingress.options(**deployment_options(cfg.ingress, 0.0)).bind(config, vision, llm)


def check_config(cfg: ServeConfig) -> None:
    """What can be checked before Ray starts: the model, the pruner's policy and its widths, the backend."""
    from tprl_ray.backbones.inputs import ModelInputs
    from tprl_ray.pruners.inllm import InLlmPruner
    from tprl_ray.pruners.lfd import LearnedPruner

    inputs = ModelInputs.load(cfg.served_backbone())
    pruner = load_pruner(cfg)
    if isinstance(pruner, LearnedPruner):
        pruner.check_widths(inputs.feature_width, inputs.embedding_width)
    if cfg.backbone.backend == "vllm":
        from tprl_ray.backbones.vllm import check_vllm

        check_vllm(cfg.served_backbone())
        if isinstance(pruner, InLlmPruner):
            raise ValueError(f"pruner {cfg.pruner!r} prunes inside the LLM: it needs backbone.backend hf")
    check_budget(cfg.budget, inputs.visual_tokens)  # a RequestError is a ValueError: the CLI prints its line
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig

    for name in ("ingress", "vision", "llm"):
        settings = getattr(cfg, name).autoscaling or {}
        unknown = sorted(set(settings) - set(AutoscalingConfig.model_fields))
        if unknown:
            raise ValueError(f"{name}.autoscaling: unknown setting {unknown[0]!r} (Serve's autoscaling_config)")
        try:
            AutoscalingConfig(**settings)
        except ValidationError as exc:
            raise ValueError(f"{name}.autoscaling: {first_error(exc)}") from None


def warn_resources(cfg: ServeConfig) -> None:
    """Say so when the cluster has fewer CPUs or GPUs than the deployments' first replicas ask for: Serve
    waits for nodes (an autoscaling cluster adds them; a fixed one never does)."""
    import ray

    from tprl_ray.ray_setup import gpus_per_actor

    def replicas(part: DeploymentConfig) -> int:
        scale = part.autoscaling or {}
        return scale.get("initial_replicas") or scale.get("min_replicas", part.pool.size)

    parts = (cfg.ingress, cfg.vision, cfg.llm)
    need = {
        "CPU": sum(replicas(p) * p.pool.cpus for p in parts),
        "GPU": sum(replicas(p) * gpus_per_actor(p.pool.gpus) for p in parts[1:]),
    }
    have = ray.cluster_resources()
    for kind, n in need.items():
        if n > have.get(kind, 0):
            print(
                f"[serve] warning: the deployments ask for {n:g} {kind}s, the cluster has {have.get(kind, 0):g}: "
                "replicas wait for nodes (lower --vision.pool.cpus / --llm.pool.cpus on a small machine)",
                flush=True,
            )


def start(cfg: ServeConfig) -> str:
    """Deploy the application on Ray (joined or started, see ``ray_address``); its base URL."""
    from tprl_ray.ray_setup import init_ray

    check_config(cfg)
    init_ray(cfg.ray_address)
    warn_resources(cfg)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    return f"http://{cfg.host}:{cfg.port}"


def command(cfg: ServeConfig) -> None:
    """`tprl serve`: deploy, then serve until interrupted (SIGINT or SIGTERM), then delete the application."""
    url = start(cfg)
    print(f"[serve] {cfg.served_name()} with pruner {cfg.pruner} (budget {cfg.budget:g}) at {url}/v1", flush=True)
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        loop.run_until_complete(stop.wait())
    finally:
        print("[serve] stopping", flush=True)
        serve.delete(cfg.app_name)
        loop.close()
