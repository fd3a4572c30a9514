"""`tprl serve` for real: the CLI on a Ray head of the test's own (127.0.0.1), the shipped LfD pruner loaded
from an MLflow registry as a pyfunc model, the official `openai` client; the answers equal `tprl eval`'s,
every bad input is a 4xx with a one-line message and the server keeps serving; the serving dashboard's
series are exported."""

import asyncio
import base64
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import mlflow
import numpy as np
import pytest
import torch
from conftest import RAY_ENV, free_port, ray_head
from PIL import Image
from test_dashboards import DASHBOARDS, load, queried, scrape, unmatched

from tprl_ray.cli import main
from tprl_ray.config import EMBEDDED_LFD, ConfigError
from tprl_ray.data.layout import read_split
from tprl_ray.pruners.lfd import LearnedPruner
from tprl_ray.pruners.pyfunc import log_pruner, pruner_directory
from tprl_ray.rl.train import stage_pruner
from tprl_ray.tracking import mlflow_run, register_pruner

TPRL = str(Path(sys.executable).parent / "tprl")
QUESTIONS = 12


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """The shipped LfD pruner registered as version 1 of ``tprl-pruner`` in a store of the test's own."""
    out = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    with mlflow_run(out, "tprl-ppo", "ppo", uri):
        register_pruner("tprl-pruner", log_pruner(stage_pruner(EMBEDDED_LFD, out / "pruner")), {})
    return uri


@contextlib.contextmanager
def serving(tmp: Path, *args: str):
    """`tprl serve` of the embedded model with ``args`` on a Ray head of its own, until the block ends."""
    metrics_port, port = free_port(), free_port()
    with ray_head(tmp / "ray", "--num-cpus=4", metrics_port=metrics_port) as address:
        cmd = [TPRL, "serve", "--ray-address", address, "--port", str(port), "--max-body-bytes", "262144"]
        cmd += ["--vision.batch-wait-s", "0.05", "--llm.batch-wait-s", "0.05", *args]
        log = tmp / "serve.log"
        with log.open("w") as sink:
            proc = subprocess.Popen(
                cmd, env={**os.environ, **RAY_ENV}, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        try:
            yield SimpleNamespace(url=url, address=address, metrics_port=metrics_port, log=log)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    assert "[serve] stopping" in log.read_text()


@pytest.fixture(scope="module")
def server(tmp_path_factory, registry):
    """The registered (shipped) LfD pruner at 25%, loaded through MLflow."""
    args = ["--pruner", "lfd", "--policy", "models:/tprl-pruner/1", "--mlflow-uri", registry, "--budget", "0.25"]
    with serving(tmp_path_factory.mktemp("serve"), *args) as running:
        yield running


def eval_predictions(server, split: Path, out: Path, pruner: str = "lfd", setting: str = "lfd_25") -> dict:
    """`tprl eval`'s answers for the first questions of ``split`` on the server's Ray head."""
    evaluated = subprocess.run(
        [TPRL, "eval", "--ray-address", server.address, "--data", str(split), "--pruners", pruner]
        + ["--budgets", "0.25", "--limit", str(QUESTIONS), "--out", str(out), "--pool.cpus", "1"],
        env={**os.environ, **RAY_ENV},
        capture_output=True,
        text=True,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    return {
        r["question_id"]: r["prediction"]
        for r in map(json.loads, out.with_suffix(".predictions.jsonl").read_text().splitlines())
        if r["setting"] == setting
    }


def chat(client, question: str, image: bytes, **extra):
    return client.chat.completions.create(
        model="embedded",
        max_tokens=8,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": question},
                    {"type": "image_url", "image_url": {"url": data_url(image)}},
                ],
            }
        ],
        extra_body=extra or None,
    )


def test_registered_pruner_loads_as_a_pyfunc_model(registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)  # restored after the test
    mlflow.set_tracking_uri(registry)
    model = mlflow.pyfunc.load_model("models:/tprl-pruner/1")
    pruner = LearnedPruner(EMBEDDED_LFD)
    features, query = torch.randn(3, 64, pruner.encoder.dims["d_v"]), torch.randn(3, pruner.policy.dims["d_query"])
    probabilities = model.predict({"features": features.numpy(), "query": query.numpy()})
    assert probabilities.shape == (3, 64)
    for f, q, p in zip(features, query, probabilities):
        assert np.allclose(p, torch.sigmoid(pruner.keep_logits(f, q, (8, 8))).numpy(), atol=1e-6)
    with pytest.raises(Exception, match="grid"):
        model.predict({"features": features[:, :60].numpy(), "query": query.numpy()})
    # tprl serve reads the pruner's files from the registry (by version or alias) without running its code
    mlflow.MlflowClient().set_registered_model_alias("tprl-pruner", "prod", "1")
    directory = pruner_directory("models:/tprl-pruner@prod")
    assert sorted(f.name for f in directory.iterdir()) == sorted(
        f.name for f in (EMBEDDED_LFD).iterdir() if f.suffix in (".json", ".safetensors")
    )
    with pytest.raises(ValueError, match="not a downloadable model"):
        pruner_directory("models:/tprl-pruner/7")


def listening(port: int) -> set[str]:
    """The IPv4 addresses a socket listens on at ``port`` (from /proc/net/tcp)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            out.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return out


def test_answers_equal_tprl_eval(server, digits_dir, tmp_path):
    from openai import OpenAI

    split = digits_dir / "test"
    expected = eval_predictions(server, split, tmp_path / "report.json")
    samples = read_split(split)[:QUESTIONS]
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["embedded"]
    assert listening(int(server.url.rsplit(":", 1)[1])) == {"127.0.0.1"}  # loopback unless --host
    images = {s.image: (split / "images" / s.image).read_bytes() for s in samples}
    with ThreadPoolExecutor(6) as pool:  # requests in flight together: batched by the deployments
        answers = list(pool.map(lambda s: chat(client, s.text, images[s.image]), samples))
    assert [a.choices[0].message.content for a in answers] == [expected[s.question_id] for s in samples]
    for answer in answers:
        usage = answer.usage
        assert (usage.visual_tokens, usage.visual_tokens_total) == (16, 64)
        assert usage.prompt_tokens > 16 and usage.completion_tokens >= 1
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert answer.choices[0].finish_reason in ("stop", "length") and answer.model == "embedded"
    # a request's own budget: every token, then 8 of them
    full = chat(client, samples[0].text, images[samples[0].image], budget=1.0)
    eight = chat(client, samples[0].text, images[samples[0].image], budget=8)
    assert (full.usage.visual_tokens, eight.usage.visual_tokens) == (64, 8)
    assert full.usage.prompt_tokens - eight.usage.prompt_tokens == 56


def bad_requests(board: bytes) -> list[tuple[str, object, int, str]]:
    """(what, JSON body or raw bytes, status, words of the message) for every refused input."""

    def body(content=None, **fields):
        content = (
            content
            if content is not None
            else [
                {"type": "text", "text": "is there a 3 ?"},
                {"type": "image_url", "image_url": {"url": data_url(board)}},
            ]
        )
        return {"model": "embedded", "max_tokens": 4, "messages": [{"role": "user", "content": content}], **fields}

    text = {"type": "text", "text": "is there a 3 ?"}
    image = lambda data: {"type": "image_url", "image_url": {"url": data}}
    bomb = png(Image.new("1", (5000, 5000)))  # 25 Mpx in a few KB
    noise = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)))
    return [
        ("invalid base64", body([text, image("data:image/png;base64,@@not-base64@@")]), 400, "base64"),
        ("not an image", body([text, image(data_url(b"these bytes are text"))]), 400, "not a readable image"),
        ("decompression bomb", body([text, image(data_url(bomb))]), 400, "5000x5000"),
        ("no image", body([text]), 400, "0 images"),
        ("two images", body([text, image(data_url(board)), image(data_url(board))]), 400, "2 images"),
        ("oversized body", body([text, image(data_url(noise))]), 413, "above the limit"),
        ("unknown model", {**body(), "model": "gpt-4o"}, 404, "not served"),
        ("max_tokens 0", body(max_tokens=0), 400, "max_tokens"),
        ("max_tokens too many", body(max_tokens=100000), 400, "max_tokens"),
        ("budget above 1", body(budget=1.5), 400, "budget"),
        ("budget 0", body(budget=0), 400, "budget"),
        ("budget above the tokens", body(budget=65), 400, "64 visual tokens"),
        ("remote image URL", body([text, image("http://127.0.0.1:9/board.png")]), 400, "not fetched"),
        ("not JSON", b"{'model': 'embedded'", 400, "not JSON"),
        ("no messages", {"model": "embedded"}, 400, "messages"),
        ("streaming", body(stream=True), 400, "streaming"),
        ("image part without a url", body([text, {"type": "image_url", "image_url": {}}]), 400, "needs {'url'"),
        ("max_completion_tokens 0", body(max_completion_tokens=0), 400, "max_tokens 0"),
        ("budget not a number", body(budget=True), 400, "budget"),
        ("nested too deeply", b"[" * 100000, 400, "nested too deeply"),
        ("not one user message", {**body(), "messages": [{"role": "system", "content": "hi"}]}, 400, "one user"),
    ]


def test_bad_inputs_are_4xx_and_the_server_keeps_serving(server, digits_dir):
    from openai import BadRequestError, NotFoundError, OpenAI

    split = digits_dir / "test"
    sample = read_split(split)[0]
    board = (split / "images" / sample.image).read_bytes()
    for what, payload, status, words in bad_requests(board):
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        response = httpx.post(
            f"{server.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30
        )
        assert response.status_code == status, (what, response.text)
        message = response.json()["error"]["message"]
        assert words in message and "\n" not in message, (what, message)
    # a chunked body (no Content-Length) is cut off at the limit too
    chunks = (b"x" * 65536 for _ in range(8))
    response = httpx.post(f"{server.url}/v1/chat/completions", content=chunks, timeout=30)
    assert response.status_code == 413 and "above the limit" in response.json()["error"]["message"]
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(BadRequestError, match="max_tokens"):
        client.chat.completions.create(
            model="embedded", max_tokens=0, messages=[{"role": "user", "content": "is there a 3 ?"}]
        )
    with pytest.raises(NotFoundError, match="not served"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    good = chat(client, sample.text, board)
    assert good.choices[0].message.content and good.usage.visual_tokens == 16
    # every series the serving dashboard queries is exported (metrics are pushed periodically: poll)
    wanted = queried([load(p) for p in DASHBOARDS if p.stem == "serve"])
    deadline, missing = time.monotonic() + 60, ["nothing scraped"]
    while missing and time.monotonic() < deadline:
        time.sleep(2)
        missing = unmatched(wanted, scrape(server.metrics_port))
    assert missing == []


def test_serve_refuses_bad_settings_before_starting(tmp_path, capsys):
    assert main(["serve", "--pruner", "tprl"]) == 2
    assert "needs --policy" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "not a loadable model checkpoint" in capsys.readouterr().err
    assert main(["serve", "--pruner", "lfd", "--policy", str(tmp_path)]) == 2
    assert "not a complete autoencoder export" in capsys.readouterr().err
    assert main(["serve", "--pruner", "vispruner", "--budget", "65"]) == 2
    assert "above the model's 64 visual tokens" in capsys.readouterr().err
    assert main(["serve", "--pruner", "vispruner", "--tau", "0.5"]) == 2
    assert "tau applies" in capsys.readouterr().err
    assert main(["serve", "--pruner", "vispruner", "--policy", str(EMBEDDED_LFD)]) == 2
    assert "policy applies" in capsys.readouterr().err
    assert main(["serve", "--pruner", "oracle"]) == 2
    assert "cannot serve requests" in capsys.readouterr().err
    assert main(["serve", "--pruner", "vispruner", "--vision.autoscaling", "{min_replicaz: 1}"]) == 2
    assert "vision.autoscaling" in capsys.readouterr().err
    # vLLM's image-embedding input cannot keep Qwen2.5-VL's M-RoPE positions
    from tprl_ray.models.tiny_qwen import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    build_model(tokenizer).config.save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    assert main(["serve", "--model", str(tmp_path / "qwen"), "--backbone.backend", "vllm", "--pruner", "random"]) == 2
    assert "serves LLaVA only" in capsys.readouterr().err


def test_explicit_tau_and_remote_images_refused_unless_public(tmp_path):
    from tprl_ray.pruners.lfd import TprlPruner
    from tprl_ray.service.api import RequestError, image_bytes
    from tprl_ray.service.config import ServeConfig

    # a PPO-trained (budget regime) pruner: top-k at a budget, or every token above an explicit tau
    stage_pruner(EMBEDDED_LFD, tmp_path)
    card = json.loads((tmp_path / "policy.json").read_text())
    (tmp_path / "policy.json").write_text(json.dumps({**card, "regime": "budget"}))
    pruner = TprlPruner(tmp_path)
    assert pruner.tau(0.25, 64) is None
    pruner.threshold = 0.7
    assert pruner.tau(0.25, 64) == 0.7
    allowed = ServeConfig(allow_remote_images=True, pruner="vispruner")
    for url in ("http://127.0.0.1:9/board.png", "http://10.0.0.1/board.png", "http://169.254.169.254/latest"):
        with pytest.raises(RequestError, match="not a public address"):
            image_bytes(url, allowed)
    with pytest.raises(RequestError, match="not fetched"):
        image_bytes("https://example.com/board.png", ServeConfig(pruner="vispruner"))


def test_count_gate_admits_one_kept_count_at_a_time():
    from tprl_ray.backbones.vllm import CountGate

    async def run() -> tuple[list[int], int]:
        gate, inside, order, peak = CountGate(), [], [], [0]
        rng = random.Random(0)

        async def request(count: int) -> None:
            await gate.admit(count)
            inside.append(count)
            assert len(set(inside)) == 1, inside  # never two counts in the engine at once
            peak[0] = max(peak[0], len(inside))
            order.append(count)
            await asyncio.sleep(rng.random() / 1000)
            inside.remove(count)
            await gate.leave()

        await asyncio.gather(*(request(rng.choice([16, 64, 144])) for _ in range(120)))
        return order, peak[0]

    order, peak = asyncio.run(run())
    assert len(order) == 120 and set(order) == {16, 64, 144}
    assert peak > 1  # requests of one count are in the engine together

    async def cancelled() -> list[int]:
        gate, order = CountGate(), []
        await gate.admit(64)  # the engine holds a 64
        waiting = asyncio.create_task(gate.admit(16))
        await asyncio.sleep(0)
        waiting.cancel()  # its client went away
        await asyncio.gather(waiting, return_exceptions=True)

        async def request(count: int) -> None:
            await gate.admit(count)
            order.append(count)
            await gate.leave()

        later = [asyncio.create_task(request(c)) for c in (16, 16, 64)]
        await asyncio.sleep(0)
        await gate.leave()
        await asyncio.wait_for(asyncio.gather(*later), 5)
        return order

    assert asyncio.run(cancelled()) == [16, 16, 64]  # the cancelled waiter blocks nobody


def test_bench_serve_writes_its_table(server, digits_dir, tmp_path):
    from tprl_ray.bench.config import ServeBenchConfig
    from tprl_ray.bench.serve import format_serve, run_serve_bench

    cfg = ServeBenchConfig(
        url=server.url, data=digits_dir / "test", concurrency=[1, 4], requests=4, warmup=1, out=tmp_path / "b.json"
    )
    result = run_serve_bench(cfg)
    assert json.loads(cfg.out.read_text()) == result
    cells = {(r["fraction"], r["concurrency"]): r for r in result["rows"]}
    assert set(cells) == {(1.0, 1), (1.0, 4), (0.25, 1), (0.25, 4)}
    assert all(r["requests"] == 4 and r["errors"] == 0 for r in cells.values())
    assert cells[(0.25, 4)]["visual_tokens"] == 16 and cells[(1.0, 1)]["visual_tokens"] == 64
    assert {(r["fraction"], r["concurrency"]) for r in result["ratios"]} == {(0.25, 1), (0.25, 4)}
    assert "throughput x" in format_serve(result)
    with pytest.raises(ConfigError, match="loopback"):
        run_serve_bench(cfg.model_copy(update={"url": "http://192.0.2.1:8000"}))
