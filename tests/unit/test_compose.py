"""docker/: every compose file validates against the Compose Specification JSON schema (vendored at
docker/compose-spec.schema.json), before and after variable interpolation, and what it wires
together exists: Dockerfiles and their COPY sources, mounted files, the orchestrator config (loaded
with Settings.load), instance URLs pointing at services of the same file, tetri CLI flags."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from orchestrator.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILES = sorted(DOCKER.glob("compose.*.yml"))
SCHEMA = json.loads((DOCKER / "compose-spec.schema.json").read_text())
EXPECTED = {"compose.native.yml", "compose.sglang.yml", "compose.tensorrt-llm.yml"}


# ---- Compose variable interpolation (the spec's ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e}, $$) ----

def _close(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text.startswith("${", i):
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced ${{ in {text!r}")


def interpolate(text: str, env: dict[str, str]) -> str:
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _close(text, i)
            expr = text[i + 2:end]
            match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?$", expr, re.S)
            if not match:
                raise ValueError(f"bad interpolation ${{{expr}}}")
            name, op, arg = match.group(1), match.group(2), match.group(3) or ""
            value = env.get(name)
            if op in (":-", "-"):
                unset = value is None or (op == ":-" and value == "")
                value = interpolate(arg, env) if unset else value
            elif op in (":?", "?"):
                if value is None or (op == ":?" and value == ""):
                    raise ValueError(f"required variable {name}: {arg}")
            elif op in (":+", "+"):
                value = interpolate(arg, env) if value else ""
            out.append(value or "")
            i = end + 1
        elif text[i] == "$" and re.match(r"\$[A-Za-z_]", text[i:]):
            name = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)", text[i:]).group(1)
            out.append(env.get(name, ""))
            i += 1 + len(name)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def interpolate_doc(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: interpolate_doc(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_doc(v, env) for v in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def test_interpolation_rules():
    env = {"A": "a", "EMPTY": "", "HOME": "/home/u"}
    assert interpolate("${A}-${B:-x}-${EMPTY:-y}-${EMPTY-z}-$$A", env) == "a-x-y--$A"
    assert interpolate("${HF:-${HOME}/.cache}", env) == "/home/u/.cache"
    assert interpolate("${R---flag}", {}) == "--flag" and interpolate("${R---flag}", {"R": ""}) == ""
    with pytest.raises(ValueError):
        interpolate("${NEED:?set it}", {})


# ---- the files ----------------------------------------------------------------------------------

def load_compose(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def resolved(path: Path) -> dict[str, Any]:
    return interpolate_doc(load_compose(path), {"HOME": "/home/user"})


def test_all_compose_files_present():
    assert {p.name for p in COMPOSE_FILES} == EXPECTED


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_compose_spec(path):
    validator = jsonschema.Draft7Validator(SCHEMA)
    for doc in (load_compose(path), resolved(path)):
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_rejects_a_broken_file():
    broken = {"services": {"x": {"image": "a", "ports": [{"target": "not-a-port"}], "bogus_key": 1}}}
    assert list(jsonschema.Draft7Validator(SCHEMA).iter_errors(broken))


def _bind_sources(service: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            parts = vol.split(":")
            if len(parts) >= 2 and (parts[0].startswith(("./", "/", "../")) or parts[0].startswith("~")):
                out.append((parts[0], parts[1]))
        elif vol.get("type") == "bind":
            out.append((vol["source"], vol["target"]))
    return out


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_wiring(path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("TETRI_"):
            monkeypatch.delenv(key)
    doc = resolved(path)
    services = doc["services"]
    # builds: Dockerfiles exist, and what they COPY exists
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = (path.parent / build["context"]).resolve()
            dockerfile = context / build["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile}"
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY "):
                    for src in line.split()[1:-1]:
                        assert (context / src).exists(), f"{dockerfile.name} copies missing {src}"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for source, _ in _bind_sources(svc):
            if source.startswith("./"):
                assert (path.parent / source).exists(), f"{name} mounts missing {source}"
    # the orchestrator: `tetri serve --config X` with X a mounted deploy YAML that Settings loads
    orch = services["orchestrator"]
    cmd = _command(orch)
    assert cmd[:2] == ["tetri", "serve"] and "--host" in cmd and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    config_in_container = cmd[cmd.index("--config") + 1]
    mounts = {target: source for source, target in _bind_sources(orch)}
    deploy = path.parent / mounts[config_in_container.rstrip("/")].removesuffix(":ro")
    assert deploy.name.startswith("deploy.") and deploy.suffix == ".yaml"
    settings = Settings.load(deploy)
    assert settings.instances, f"{deploy.name} lists no instances"
    roles = {spec.role for spec in settings.instances}
    assert {"prefill", "decode"} <= roles
    backend = {"compose.native.yml": "native", "compose.sglang.yml": "sglang",
               "compose.tensorrt-llm.yml": "tensorrt-llm"}[path.name]
    for spec in settings.instances:
        assert spec.backend == backend
        assert spec.model == settings.model
        target = urlsplit(spec.url)
        assert target.hostname in services, f"{spec.url}: no service {target.hostname}"
        served = " ".join(_command(services[target.hostname]))
        port = str(target.port)
        assert port in served or port == "9000", f"{spec.url}: service does not listen on {port}"
        # the adapter for it accepts the options given
        from orchestrator.cluster import make_backend

        make_backend(spec, spec.id or "x")
    # the GPU engines load the model the orchestrator tokenizes for
    for name, svc in services.items():
        if name == "orchestrator" or svc.get("build"):
            continue
        if svc.get("profiles"):
            continue
        assert settings.model in " ".join(_command(svc)), f"{name} serves another model than {settings.model}"


def test_worker_and_serve_flags_exist():
    from typer.main import get_command

    from orchestrator.cli import app

    cli = get_command(app)
    worker = {opt for p in cli.commands["worker"].params for opt in p.opts}
    serve = {opt for p in cli.commands["serve"].params for opt in p.opts}
    doc = resolved(DOCKER / "compose.native.yml")
    entry = re.search(r'ENTRYPOINT \[(.*)\]', (DOCKER / "Dockerfile.worker").read_text()).group(1)
    entry_args = json.loads(f"[{entry}]")
    assert entry_args[:2] == ["tetri", "worker"]
    for name in ("prefill", "decode"):
        args = entry_args[2:] + _command(doc["services"][name])
        assert {a for a in args if a.startswith("--")} <= worker
    for path in COMPOSE_FILES:
        args = _command(resolved(path)["services"]["orchestrator"])
        assert {a for a in args if a.startswith("--")} <= serve


def test_sglang_servers_pair_up():
    services = resolved(DOCKER / "compose.sglang.yml")["services"]
    p, d = (" ".join(_command(services[n])) for n in ("sglang-prefill", "sglang-decode"))
    assert "--disaggregation-mode prefill" in p and "--disaggregation-mode decode" in d
    for flag in ("--disaggregation-transfer-backend", "--disaggregation-bootstrap-port"):
        assert re.search(flag + r" (\S+)", p).group(1) == re.search(flag + r" (\S+)", d).group(1)
    settings = Settings.load(DOCKER / "deploy.sglang.yaml")
    prefill = next(s for s in settings.instances if s.role == "prefill")
    assert str(prefill.options["bootstrap_port"]) == re.search(r"--disaggregation-bootstrap-port (\d+)", p).group(1)
    assert "--enable-metrics" in p and "--enable-metrics" in d


def test_trtllm_worker_yamls():
    ctx = yaml.safe_load((DOCKER / "trtllm-context.yaml").read_text())
    gen = yaml.safe_load((DOCKER / "trtllm-generation.yaml").read_text())
    assert ctx["disable_overlap_scheduler"] is True
    assert ctx["cache_transceiver_config"]["backend"] == gen["cache_transceiver_config"]["backend"]
    assert ctx["cache_transceiver_config"]["kv_transfer_timeout_ms"] > 0
    assert ctx["enable_iter_perf_stats"] and gen["enable_iter_perf_stats"]
    assert ctx["kv_cache_config"]["tokens_per_block"] == gen["kv_cache_config"]["tokens_per_block"]
    assert ctx["enable_chunked_prefill"] and ctx["max_num_tokens"] > 0
    services = resolved(DOCKER / "compose.tensorrt-llm.yml")["services"]
    configs = {"trtllm-context": "/etc/trtllm/context.yaml", "trtllm-generation": "/etc/trtllm/generation.yaml"}
    for name, cfg in configs.items():
        cmd = _command(services[name])
        assert cmd[0] == "trtllm-serve" and cmd[cmd.index("--config") + 1] == cfg
        assert cmd[cmd.index("--backend") + 1] == "pytorch"
    settings = Settings.load(DOCKER / "deploy.tensorrt-llm.yaml")
    gen_spec = next(s for s in settings.instances if s.role == "decode")
    assert gen_spec.options.get("allow_flip") is False or gen.get("disable_overlap_scheduler") is True
