"""``mlx-stack install`` and friends: services rendered from one description of the roles.

launchd and systemd do not run here, so ``launchctl`` and ``systemctl`` are recording
stand-ins on PATH that keep what is loaded in a file; the rendered files are checked as
the OS would read them (``plistlib``, ``systemd-analyze verify``), and the three roles are
started exactly as the rendered units say and serve a request.
"""

from __future__ import annotations

import json
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from mlx_stack.cli.services import write_examples
from testkit.harness import ROOT, Proc, free_port, wait_for

STAND_IN = r"""#!/bin/sh
# A recording stand-in for {tool}: appends its arguments to $RECORD, keeps what is
# loaded in $LOADED (one name a line), answers queries from it.
echo "{tool} $*" >> "$RECORD"
touch "$LOADED"
forget() {{ grep -vx "$1" "$LOADED" > "$LOADED.new"; mv "$LOADED.new" "$LOADED"; }}
case "{tool} $*" in
  "launchctl print "*)
    name=${{2##*/}}; grep -qx "$name" "$LOADED" || exit 113
    printf '%s = {{\n\tstate = running\n\tpid = %s\n\truns = 1\n}}\n' "$2" "$$" ;;
  "launchctl bootstrap "*)
    name=$(basename "$3" .plist); echo "$name" >> "$LOADED" ;;
  "launchctl bootout "*)
    forget "${{2##*/}}" ;;
  "systemctl --user show "*)
    if grep -qx "$3" "$LOADED"; then state=active; else state=inactive; fi
    printf 'LoadState=loaded\nActiveState=%s\nMainPID=0\nNRestarts=0\n' "$state" ;;
  "systemctl --user restart "*|"systemctl --user start "*)
    echo "$3" >> "$LOADED" ;;
  "systemctl --user disable --now "*|"systemctl --user stop "*)
    forget "$(eval echo \${{$#}})" ;;
esac
exit 0
"""


def parse_unit(text: str) -> tuple[list[str], dict[str, str], Path]:
    """(argv, environment, stdout file) of a rendered unit, as systemd reads them."""
    argv: list[str] = []
    env: dict[str, str] = {}
    out = Path()
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "ExecStart":
            argv = shlex.split(value)
        elif key == "Environment":
            name, _, val = shlex.split(value)[0].partition("=")
            env[name] = val
        elif key == "StandardOutput":
            out = Path(value.removeprefix("append:"))
    return argv, env, out


class Machine:
    """A user's home with the stand-ins on PATH; runs ``mlx-stack`` there."""

    def __init__(self, tmp: Path, models_dir: Path) -> None:
        self.user = tmp / "user"
        self.models_dir = models_dir
        self.home = self.user / ".mlx-stack"
        self.home.mkdir(parents=True)
        (self.home / "config.toml").write_text(f'models_dir = "{models_dir}"\n')
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        for tool in ("launchctl", "systemctl"):
            path = bin_dir / tool
            path.write_text(STAND_IN.format(tool=tool))
            path.chmod(0o755)
        self.record = tmp / "record"
        self.env = {**os.environ, "HOME": str(self.user), "MLX_STACK_HOME": str(self.home),
                    "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(self.record),
                    "LOADED": str(tmp / "loaded"), "COLUMNS": "200"}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.record.write_text("")
        done = subprocess.run([sys.executable, "-m", "mlx_stack.cli", *args], env=self.env,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def commands(self) -> list[str]:
        return self.record.read_text().splitlines()


@pytest.fixture
def machine(tmp_path: Path, models_dir: Path) -> Machine:
    return Machine(tmp_path, models_dir)


def test_launch_agents_parse_and_say_how_each_role_runs(machine: Machine) -> None:
    machine.run("install", "--manager", "launchd", "--port", "4555")
    agents = machine.user / "Library" / "LaunchAgents"
    plists = {p.name: plistlib.loads(p.read_bytes()) for p in agents.glob("*.plist")}
    assert sorted(plists) == ["com.mlx-stack.broker.plist", "com.mlx-stack.gateway.plist",
                              "com.mlx-stack.worker-SmolLM2-135M-Instruct.plist"]
    for name, agent in plists.items():
        role = name.removeprefix("com.mlx-stack.").removesuffix(".plist")
        assert agent["Label"] == f"com.mlx-stack.{role}"
        tiers = ["--model", "default=fast,standard"] if role.startswith("worker") else []
        assert agent["ProgramArguments"] == [sys.executable, "-m", "mlx_stack.cli",
                                             role.split("-")[0], *tiers]
        assert agent["KeepAlive"] is True and agent["RunAtLoad"] is True
        env = agent["EnvironmentVariables"]
        assert env["MLX_STACK_HOME"] == str(machine.home)
        assert env["MLX_STACK_GATEWAY_PORT"] == "4555"  # a flag becomes the services'
        assert env["MLX_STACK_LOG_FILE"] == str(machine.home / "logs" / f"{role}.log")
        assert agent["StandardErrorPath"] == str(machine.home / "logs" / f"{role}.out")
    assert plists["com.mlx-stack.broker.plist"]["EnvironmentVariables"][
        "MLX_STACK_EXPECT_MODELS"] == "SmolLM2-135M-Instruct,fast,standard"
    assert (machine.home / "logs").is_dir()  # launchd opens StandardOutPath there


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian: apt-get install systemd)")
def test_systemd_units_pass_systemd_analyze_verify(machine: Machine, tmp_path: Path) -> None:
    machine.run("install", "--manager", "systemd")
    units = sorted((machine.user / ".config" / "systemd" / "user").glob("*.service"))
    assert [u.name for u in units] == ["mlx-stack-broker.service", "mlx-stack-gateway.service",
                                       "mlx-stack-worker-SmolLM2-135M-Instruct.service"]
    runtime = tmp_path / "run"  # a user manager's runtime directory, for --user
    runtime.mkdir(mode=0o700)
    done = subprocess.run(["systemd-analyze", "--user", "verify", *map(str, units)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    assert done.returncode == 0, done.stderr
    assert "mlx-stack" not in done.stderr, done.stderr  # no warning about our units


@pytest.mark.parametrize("manager", ["launchd", "systemd"])
def test_install_and_uninstall_twice_change_nothing_the_second_time(
        machine: Machine, manager: str) -> None:
    machine.run("install", "--manager", manager)
    first = machine.commands()
    loads = [c for c in first if " bootstrap " in c or " restart " in c]
    assert len(loads) == 3, first
    machine.run("install", "--manager", manager)
    assert not [c for c in machine.commands() if " print " not in c and " show " not in c]
    # A second model: its worker is added and the broker (which expects its names)
    # rewritten; the gateway and the first worker (its tiers kept) are left alone.
    other = machine.user / "other-model"
    other.symlink_to(machine.models_dir / "SmolLM2-135M-Instruct", target_is_directory=True)
    done = machine.run("install", "--manager", manager, "--model", "default=fast,standard",
                       "--model", str(other))
    changed = {line.rsplit("/", 1)[1] for line in done.stdout.splitlines()
               if line.startswith("write ")}
    assert not any("gateway" in c or "SmolLM2" in c for c in changed), changed
    assert any("other-model" in c for c in changed) and any("broker" in c for c in changed)
    # ... and dropped again: its service is stopped before its file goes.
    machine.run("install", "--manager", manager)
    commands = machine.commands()
    stopped = [c for c in commands if " bootout " in c or " disable " in c]
    assert [c for c in stopped if "other-model" in c] == stopped[:1], commands
    assert not any("gateway" in c or "SmolLM2" in c for c in commands
                   if " print " not in c and " show " not in c), commands
    machine.run("uninstall", "--manager", manager)
    stops = [c for c in machine.commands() if " bootout " in c or " disable " in c]
    assert len(stops) == 3, machine.commands()
    assert not list(machine.user.rglob("com.mlx-stack.*")) + list(
        machine.user.rglob("mlx-stack-*.service"))
    machine.run("uninstall", "--manager", manager)
    assert machine.commands() == []


def test_status_shows_each_role_and_says_when_the_broker_is_away(machine: Machine) -> None:
    machine.run("install", "--manager", "systemd")
    logs = machine.home / "logs"
    logs.mkdir(exist_ok=True)
    (logs / "gateway.log").write_text("2026-11-30 00:00:00.000 ERROR gateway boom\nfine\n")
    view = json.loads(machine.run("status", "--manager", "systemd", "--json").stdout)
    roles = {r["role"]: r for r in view["roles"]}
    assert sorted(roles) == ["broker", "gateway", "worker-SmolLM2-135M-Instruct"]
    assert all(r["running"] for r in roles.values())
    assert roles["gateway"]["last_error"].endswith("ERROR gateway boom")
    assert view["mesh"] is None  # no broker runs here: said, not hung
    machine.run("down", "--manager", "systemd")
    assert sum(" stop " in c for c in machine.commands()) == 3


def dry_run_units(stdout: str) -> dict[str, str]:
    """The units ``install --dry-run`` prints (``# PATH`` then the file), by file name."""
    units: dict[str, list[str]] = {}
    current: list[str] = []
    for line in stdout.splitlines():
        if line.startswith("# /") and line.endswith(".service"):
            current = units.setdefault(line.rsplit("/", 1)[1], [])
        else:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in units.items()}


def test_install_renders_each_workers_tiers_into_its_service(machine: Machine) -> None:
    own = machine.user / "Qwen-mini"  # a model of the user's own (the default's files)
    own.symlink_to(machine.models_dir / "SmolLM2-135M-Instruct", target_is_directory=True)
    done = machine.run("install", "--manager", "systemd", "--dry-run",
                       "--model", f"{own}=premium", "--model", "default")
    units = dry_run_units(done.stdout)
    assert parse_unit(units["mlx-stack-worker-Qwen-mini.service"])[0][3:] == [
        "worker", "--model", f"{own}=premium"]
    # Beside another model the default takes no tier unless given one.
    assert parse_unit(units["mlx-stack-worker-SmolLM2-135M-Instruct.service"])[0][3:] == [
        "worker", "--model", "default="]
    assert parse_unit(units["mlx-stack-broker.service"])[1]["MLX_STACK_EXPECT_MODELS"] == (
        "Qwen-mini,premium,SmolLM2-135M-Instruct")
    assert not (machine.user / ".config" / "systemd").exists()  # a dry run writes nothing
    # No --model: config.toml's [models] serve, each with its tiers.
    with (machine.home / "config.toml").open("a") as config:
        config.write(f'[models]\nserve = ["{own}=standard,premium", "default=fast"]\n')
    units = dry_run_units(machine.run("install", "--manager", "systemd", "--dry-run").stdout)
    assert parse_unit(units["mlx-stack-worker-Qwen-mini.service"])[0][-1] == (
        f"{own}=standard,premium")
    assert parse_unit(units["mlx-stack-worker-SmolLM2-135M-Instruct.service"])[0][-1] == (
        "default=fast")


def test_deploy_examples_are_what_install_renders(tmp_path: Path) -> None:
    written = write_examples(tmp_path)
    for path in written:
        shipped = ROOT / "deploy" / path.relative_to(tmp_path)
        assert shipped.read_bytes() == path.read_bytes(), (
            f"{shipped} is stale: run `python -c 'from mlx_stack.cli.services import "
            "write_examples; from pathlib import Path; write_examples(Path(\"deploy\"))'`")


@pytest.mark.model
def test_the_roles_serve_when_started_exactly_as_the_units_say(machine: Machine,
                                                              tmp_path: Path) -> None:
    port, broker_port = free_port(), free_port()
    machine.run("install", "--manager", "systemd", "--port", str(port),
                "--broker-port", str(broker_port), "--node-id", "unit-node")
    units = machine.user / ".config" / "systemd" / "user"
    procs = []
    try:
        for name in ("mlx-stack-broker.service",
                     "mlx-stack-worker-SmolLM2-135M-Instruct.service",
                     "mlx-stack-gateway.service"):
            argv, env, out = parse_unit((units / name).read_text())
            # stdout and stderr where systemd puts them: install made the directory
            procs.append(Proc(name, argv, {"PATH": os.environ["PATH"], **env}, out))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0, timeout=60)

        def served() -> str | None:
            for proc in procs:
                assert proc.alive(), proc.output()
            try:
                return client.chat.completions.create(
                    model="standard", max_tokens=5, temperature=0,
                    messages=[{"role": "user", "content": "hi"}]).choices[0].message.content
            except openai.APIConnectionError:
                return None

        assert wait_for("a request served through the units' roles", served, timeout=120)
        logs = machine.home / "logs"  # each role writes its own log there, not to stderr
        assert {p.name for p in logs.glob("*.log")} == {
            "broker.log", "gateway.log", "worker-SmolLM2-135M-Instruct.log"}
    finally:
        for proc in procs:
            proc.stop()
