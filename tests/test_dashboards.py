"""The Grafana dashboards are well-formed, and every series the PPO dashboards query is exported by a short real
PPO run (scorer, env runners, driver) on a private Ray whose Prometheus endpoint the test scrapes
(``serve.json``'s series: by `tprl serve` in tests/test_serve.py)."""

import json
import re
import time
import urllib.request
from pathlib import Path

import ray
from conftest import free_port
from test_ppo import ppo_inputs, small_run  # noqa: F401  (the PPO tests' tiny data and LfD init)

from tprl_ray.ray_setup import loopback

DASHBOARDS = sorted((Path(__file__).parents[1] / "dashboards").glob("*.json"))
PPO_DASHBOARDS = [p for p in DASHBOARDS if p.stem != "serve"]
GPU_ONLY = {"ray_node_gpus_utilization", "ray_node_gram_used"}  # exported only by nodes that have GPUs
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?(\s*\()?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def targets(dashboard: dict) -> list[dict]:
    return [t for p in dashboard["panels"] for t in p.get("targets", [])]


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """``(metric, [(label, op, value)])`` of each series selector of a PromQL expression."""
    expr = GROUPING.sub(" ", re.sub(r"\[[^\]]*\]", "", expr))
    return [
        (m[1], MATCHER.findall(m[2] or "")) for m in SELECTOR.finditer(expr) if not m[3] and m[1] not in PROMQL_WORDS
    ]


def queried(dashboards: list[dict]) -> dict[str, list]:
    """Each selector of every panel target and template variable, with the PromQL it came from."""
    exprs = [t["expr"] for d in dashboards for t in targets(d)]
    exprs += [v["query"]["query"] for d in dashboards for v in d["templating"]["list"] if v["type"] == "query"]
    exprs = [re.sub(r"^label_values\((.*),\s*(\w+)\)$", r"sum(\1) by (\2)", e) for e in exprs]
    return {expr: selectors(expr) for expr in exprs}


def scrape(port: int) -> list[tuple[str, dict, float]]:
    """The samples (name, labels, value) of Ray's Prometheus export."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [
        (m[1], dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or "")), float(m[3]))
        for m in map(SAMPLE.match, text.splitlines())
        if m
    ]


def selects(labels: dict, matchers: list[tuple[str, str, str]]) -> bool:
    """Whether a series passes the matchers (template variables such as ``$SessionName`` match anything)."""
    for label, op, value in matchers:
        pattern = re.sub(r"\\?\$\w+", ".*", value if "~" in op else re.escape(value))
        if (re.fullmatch(pattern, labels.get(label, "")) is not None) != op.startswith("="):
            return False
    return True


def unmatched(wanted: dict[str, list], series: list[tuple[str, dict, float]]) -> list[str]:
    """The selectors, and the labels grouped by, that nothing in ``series`` satisfies."""
    missing = []
    for expr, sels in wanted.items():
        found = []
        for name, matchers in sels:
            hits = [labels for n, labels, _ in series if n == name and selects(labels, matchers)]
            if not hits and name not in GPU_ONLY:
                missing.append(f"{name} in {expr}")
            found += hits
        grouped = {g.strip() for group in GROUPING.findall(expr) for g in group.split(",")} - {""}
        missing += [f"label {g} in {expr}" for g in sorted(grouped) if found and not any(g in f for f in found)]
    return missing


def test_dashboards_are_well_formed():
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    assert {p.stem for p in DASHBOARDS} == {"scorer", "env_runners", "ppo_learner", "serve"}
    readme = (DASHBOARDS[0].parent / "README.md").read_text()
    for path in DASHBOARDS:
        d = load(path)
        assert d["schemaVersion"] >= 36 and d["uid"] and path.name in readme
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in d["panels"]:
            if panel["type"] == "row":
                continue
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), f"{path.name}: {panel['title']}"
            for item in (panel, *panel["targets"]):
                assert item["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    names = {name for sels in queried([load(p) for p in DASHBOARDS]).values() for name, _ in sels}
    assert {
        "ray_tprl_scorer_samples_total",
        "ray_tprl_env_steps_total",
        "ray_tprl_ppo_policy_loss",
        "ray_tprl_serve_requests_total",
    } <= names
    assert all(name.removeprefix("ray_") in METRICS_GAUGES for name in GPU_ONLY)


def test_selector_parsing_and_matching():
    expr = (
        'histogram_quantile(0.95, sum(rate(ray_a_bucket{x=~"$V",y="b"}[$__rate_interval])) by (le)) '
        '/ on() sum(ray_b{x!="1"}) * 1e3'
    )
    assert selectors(expr) == [("ray_a_bucket", [("x", "=~", "$V"), ("y", "=", "b")]), ("ray_b", [("x", "!=", "1")])]
    series = [("ray_a_bucket", {"x": "1", "y": "b", "le": "1"}, 1.0), ("ray_b", {"x": "2"}, 1.0)]

    def check(*exprs):
        return unmatched({e: selectors(e) for e in exprs}, series)

    assert check(expr) == []
    assert check("sum(ray_b) by (x, z)", 'ray_a_bucket{y="c"} + ray_c', 'ray_b{x=~"1|3"}') == [
        "label z in sum(ray_b) by (x, z)",
        'ray_a_bucket in ray_a_bucket{y="c"} + ray_c',
        'ray_c in ray_a_bucket{y="c"} + ray_c',
        'ray_b in ray_b{x=~"1|3"}',
    ]


def test_every_queried_series_is_exported(ppo_inputs, tmp_path):  # noqa: F811
    from tprl_ray.rl.train import train_ppo

    port, wanted, scraped = free_port(), queried([load(p) for p in PPO_DASHBOARDS]), []
    with loopback():  # as init_ray starts a Ray: every server on 127.0.0.1
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=False,
            _metrics_export_port=port,
            _system_config={"metrics_report_interval_ms": 1000},
        )

    def problems(series: list[tuple[str, dict, float]]) -> list[str]:
        """Missing series, or counts that disagree (env steps: ours, RLlib's, scored samples)."""
        total = {name: sum(v for n, _, v in series if n == name) for name, _, _ in series}
        counts = [total.get(f"ray_tprl_{n}", 0) for n in ("env_steps_total", "ppo_env_steps", "scorer_samples_total")]
        episodes = [total.get(f"ray_tprl_{n}", 0) for n in ("env_episodes_total", "env_kept_fraction_count")]
        consistent = (
            counts[0] > 0
            and episodes[0] > 0
            and len(set(counts)) == len(set(episodes)) == 1
            and total.get("ray_tprl_ppo_iteration") == 1
        )
        return unmatched(wanted, series) + ([] if consistent else [f"steps {counts}, episodes {episodes}"])

    def scrape_while_alive(iteration, metrics):  # export is periodic: poll until everything is there
        deadline = time.monotonic() + 45
        while not scraped or (problems(scraped[-1]) and time.monotonic() < deadline):
            time.sleep(1)
            scraped.append(scrape(port))

    train_ppo(small_run(ppo_inputs, tmp_path / "ppo", 1), on_iteration=scrape_while_alive)
    assert scraped, "on_iteration was not called"
    assert problems(scraped[-1]) == []
