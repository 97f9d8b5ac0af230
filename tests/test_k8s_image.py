"""The Dockerfile, checked without building it (no base image can be pulled here): its shape
matches the manifests, and its install steps, run into a fresh virtualenv from a build context
filtered by .dockerignore, give a node that starts the way the ENTRYPOINT starts it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from roomcast import config as config_module
from tests.harness import ROOT
from tests.test_k8s import (
    Instruction,
    descendants,
    dockerfile,
    final_stage,
    find,
    image_command,
    image_env,
    map_paths,
    node_container,
    prepare_tree,
    render,
)

#: RUN lines the test cannot run here (they need the base image's apt or /etc/passwd), by the
#: command they start with; every other RUN must be an install step, which the test runs.
NOT_RUN_HERE = ("apt-get update", "groupadd ")
INSTALL_STEP = re.compile(r"^python -m (venv|pip) ")


def test_the_dockerfile_matches_the_manifests() -> None:
    """Multi-stage on a slim Python, no toolchain or pip in the final stage, a numeric non-root
    USER equal to the pods' runAsUser, EXPOSE equal to the container ports and the node's
    defaults, an exec-form ENTRYPOINT through tini, and no command or args in the pod."""
    instructions = dockerfile()
    stages = [i for i in instructions if i.name == "FROM"]
    assert len(stages) >= 2
    args = {i.args.split("=", 1)[0]: i.args.split("=", 1)[1] for i in instructions
            if i.name == "ARG" and "=" in i.args}
    image = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.(\d+)-slim(-\w+)?", image), image
    minor = int(image.split(".")[1].split("-")[0])
    assert minor >= 11  # requires-python
    final = final_stage(instructions)
    runs = " ".join(i.args for i in final if i.name == "RUN")
    assert not re.search(r"\b(apt-get|gcc|build-essential|pip)\b", runs), runs
    copies = [i.args for i in final if i.name == "COPY"]
    assert all(c.startswith("--from=build ") for c in copies), copies
    (user,) = [i.args for i in final if i.name == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit()
    exposed = sorted(int(p) for i in final if i.name == "EXPOSE" for p in i.args.split())
    defaults = config_module.Config()
    assert exposed == sorted([defaults.port, defaults.api_port])
    command = image_command(instructions)
    assert command[:2] == ["/usr/bin/tini", "--"] and command[2:] == [
        "/opt/roomcast/bin/roomcast", "node"]
    assert [i.args for i in final if i.name == "STOPSIGNAL"] in ([], ["SIGTERM"])
    env = image_env(instructions, "/usr/bin")
    assert env["ROOMCAST_HOST"] == env["ROOMCAST_API_HOST"] == "0.0.0.0"


def test_the_pods_run_the_image_as_it_is_built(tmp_path: Path) -> None:
    """The node container uses the image's ENTRYPOINT and user, its container ports are the
    EXPOSEd ones, and the preStop hook's interpreter is the image's virtualenv."""
    instructions = dockerfile()
    final = final_stage(instructions)
    (user,) = [i.args for i in final if i.name == "USER"]
    uid, _, gid = user.partition(":")
    exposed = sorted(int(p) for i in final if i.name == "EXPOSE" for p in i.args.split())
    tree = prepare_tree(tmp_path)
    for overlay in ("dev", "production"):
        deployment = find(render(tree / "overlays" / overlay), "Deployment", "roomcast")
        pod = deployment["spec"]["template"]["spec"]
        assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
            int(uid), int(gid))
        container = node_container(deployment)
        assert "command" not in container and "args" not in container
        assert sorted(p["containerPort"] for p in container["ports"]) == exposed
        hook = container["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[0].startswith("/opt/roomcast/bin/")


def dockerignored(context: Path, patterns: list[str]) -> list[Path]:
    """The files of ``context`` that a Docker build would send, with .dockerignore's rules:
    patterns in order, the last match wins, a match on a parent directory counts, ``*`` stays
    within one path element, ``**`` spans any, ``!`` re-includes."""
    rules = []
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = ""
        i = 0
        while i < len(body):
            if body.startswith("**", i):
                regex += ".*"
                i += 2
                if body.startswith("/", i):
                    regex += "/?"
                    i += 1
            elif body[i] == "*":
                regex += "[^/]*"
                i += 1
            elif body[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(body[i])
                i += 1
        rules.append((re.compile(regex + "$"), negate))
    kept = []
    for path in sorted(context.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(context).as_posix()
        parts = rel.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        excluded = False
        for regex, negate in rules:
            if any(regex.match(prefix) for prefix in prefixes):
                excluded = not negate
        if not excluded:
            kept.append(path)
    return kept


def build_context(dest: Path) -> Path:
    """The checkout as the Docker build would see it (after .dockerignore)."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    files = dockerignored(ROOT, patterns)
    for path in files:
        target = dest / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest


def run_build_stage(stage: list[Instruction], context: Path, root: Path) -> dict[str, str]:
    """COPY from ``context`` and run the install steps of the build stage with the image's
    paths under ``root``; returns the path map used (image path -> local)."""
    mapped = {"/opt/roomcast": str(root / "opt/roomcast"), "/src": str(root / "src")}
    shim = root / "bin"
    shim.mkdir(parents=True)
    # The base image's `python` is an interpreter with pip: this one.
    (shim / "python").symlink_to(sys.executable)
    for instruction in stage:
        if instruction.name == "COPY":
            *sources, dest = instruction.args.split()
            for source in sources:
                local_dest = Path(map_paths(dest.rstrip("/"), mapped))
                origin = context / source
                if dest.endswith("/"):
                    local_dest.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, local_dest / origin.name)
                else:
                    shutil.copytree(origin, local_dest)
        elif instruction.name == "RUN":
            command = instruction.args
            if command.startswith(NOT_RUN_HERE):
                continue
            steps = [step.strip() for step in command.split("&&")]
            assert all(INSTALL_STEP.match(step) for step in steps), (
                f"a RUN line this test does not know: {command}")
            local = re.sub(r"(?<![\w/])(/opt/roomcast|/src)(?=[/\s]|$)",
                           lambda m: mapped[m.group(1)], command)
            result = subprocess.run(
                ["bash", "-c", local], capture_output=True, text=True, timeout=300,
                check=False, cwd=root,
                env={**os.environ, "PATH": f"{shim}:{os.environ.get('PATH', '')}"})
            assert result.returncode == 0, f"{local}\n{result.stdout}\n{result.stderr}"
    return mapped


@pytest.mark.timeout(300)
def test_the_dockerfile_install_steps_give_a_node_that_starts_as_the_entrypoint(
        tmp_path: Path) -> None:
    """The build stage's COPY and install RUN lines, run into a fresh virtualenv from the
    .dockerignore'd context, install roomcast with no pip in the result; the ENTRYPOINT
    (tini when installed here) with the image's ENV starts a node whose /livez answers 200,
    and SIGTERM ends it with 0."""
    instructions = dockerfile()
    build = [i for i in instructions if i.stage == 0]
    assert build[0].args.endswith(" AS build")
    context = build_context(tmp_path / "context")
    sent = sorted(p.relative_to(context).as_posix() for p in context.rglob("*") if p.is_file())
    assert "pyproject.toml" in sent and "README.md" in sent
    assert all(p.startswith("node/") or p in ("pyproject.toml", "README.md") for p in sent)
    assert not [p for p in sent if "__pycache__" in p or ".egg-info" in p]
    mapped = run_build_stage(build, context, tmp_path / "image")
    venv = Path(mapped["/opt/roomcast"])
    assert not (venv / "bin" / "pip").exists(), "the final image would carry pip"
    where = subprocess.run([str(venv / "bin/python"), "-c", "import roomcast; print("
                            "roomcast.__file__)"], capture_output=True, text=True, check=True,
                           cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}).stdout.strip()
    assert where.startswith(str(venv)), where
    command = [map_paths(part, mapped) for part in image_command(instructions)]
    tini = shutil.which("tini")
    command = [tini, *command[1:]] if tini else command[2:]
    env = image_env(instructions, "/usr/bin:/bin")
    env = {k: map_paths(v, mapped) for k, v in env.items()}
    env["PATH"] = env["PATH"].replace("/opt/roomcast", mapped["/opt/roomcast"])
    # Loopback and ephemeral ports here; the image's 0.0.0.0 is checked above.
    env.update(ROOMCAST_HOST="127.0.0.1", ROOMCAST_API_HOST="127.0.0.1", ROOMCAST_PORT="0",
               ROOMCAST_API_PORT="0", ROOMCAST_DRAIN_DELAY="0")  # No one to drain.
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        started = None
        deadline = time.monotonic() + 20
        lines = []
        while started is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("{") and json.loads(line).get("event") == "node started":
                started = json.loads(line)
        assert started is not None, "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{started['api_port']}/livez",
                                    timeout=5) as reply:
            assert reply.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:  # By PID: tini's child is in a process group of its own.
            for pid in [*descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=10)
