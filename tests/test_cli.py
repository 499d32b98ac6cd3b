"""The `vlm-chat` command line, run in-process on tiny towers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from cli.main import build_parser, main


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("command", subcommands())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: vlm-chat" in capsys.readouterr().out


@pytest.fixture(scope="module")
def cli_bundle(tiny_parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bundle"
    assert main(["build", "--vision", str(tiny_parts["vision"]), "--llm", str(tiny_parts["llm"]),
                 "--projector", "linear", "--max-context", "256", "--out", str(out)]) == 0
    return out


def test_build_writes_a_bundle(cli_bundle):
    config = json.loads((cli_bundle / "vlm_config.json").read_text())
    assert config["projector"]["type"] == "linear"
    assert config["num_image_tokens"] == 16


def test_ask_streams_an_answer(cli_bundle, tmp_path, capsys):
    image = tmp_path / "red.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(image)
    assert main(["ask", "--model", str(cli_bundle), "--image", str(image), "--max-new-tokens", "5",
                 "--stats", "what is in this image ?"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n")
    assert "prompt tokens" in captured.err


def test_ask_without_model_or_with_bad_image_is_one_clear_line(cli_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLM_CHAT_DEFAULT_MODEL", str(tmp_path / "no-such-bundle"))
    assert main(["ask", "what ?"]) == 2
    assert "no --model given and no default model at" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    assert main(["ask", "--model", str(cli_bundle), "--image", str(bad), "what ?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jpg: not a readable image" in err


def test_caption_folder_to_jsonl_skips_bad_files(cli_bundle, tmp_path, capsys):
    folder = tmp_path / "pics"
    (folder / "sub").mkdir(parents=True)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (12, 12), colour).save(folder / ("sub" if i == 2 else ".") / f"img{i}.png")
    (folder / "broken.png").write_text("not a png")
    out = tmp_path / "captions.jsonl"
    code = main(["caption", str(folder), "--model", str(cli_bundle), "--out", str(out),
                 "--max-new-tokens", "4", "--batch-size", "2"])
    assert code == 1  # one unreadable file
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"].rsplit("/", 1)[-1] for r in rows) == ["img0.png", "img1.png", "img2.png"]
    assert all(isinstance(r["caption"], str) for r in rows)
    assert "broken.png" in capsys.readouterr().err


def test_caption_to_stdout(cli_bundle, tmp_path, capsys):
    image = tmp_path / "one.png"
    Image.new("RGB", (12, 12)).save(image)
    assert main(["caption", str(image), "--model", str(cli_bundle), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}\t")


def test_export_command(cli_bundle, tmp_path):
    assert main(["export", "--model", str(cli_bundle), "--format", "hf-llava", "--out", str(tmp_path / "llava")]) == 0
    assert json.loads((tmp_path / "llava" / "config.json").read_text())["model_type"] == "llava"


def test_build_rejects_a_non_gguf_file(tiny_parts, tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04")
    assert main(["build", "--vision", str(tiny_parts["vision"]), "--llm", str(fake), "--out", str(tmp_path / "b")]) == 2
    assert "not GGUF" in capsys.readouterr().err


def test_default_model_is_used_without_model_flag(cli_bundle, monkeypatch, capsys):
    monkeypatch.setenv("VLM_CHAT_DEFAULT_MODEL", str(cli_bundle))
    assert main(["ask", "--max-new-tokens", "3", "--stats", "hello"]) == 0
    assert "prompt tokens" in capsys.readouterr().err
    from serve.commands import config_from_args
    from cli.main import build_parser

    assert config_from_args(build_parser().parse_args(["serve"])).model == str(cli_bundle)
    # `--model default` names it explicitly (train on top of it), unless ./default exists.
    from vlm_chat.defaults import resolve_model

    assert resolve_model("default") == str(cli_bundle)
    monkeypatch.chdir(cli_bundle.parent)
    (cli_bundle.parent / "default").mkdir(exist_ok=True)
    assert resolve_model("default") == "default"


# ---------------------------------------------------------------- the allocator training runs under


def test_allocator_relaunch_preloads_tcmalloc_once(monkeypatch):
    from vlm_chat import devices
    from vlm_chat.errors import ConfigError

    monkeypatch.setattr(devices, "fast_allocator", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(devices.sys, "platform", "linux")
    command, env = devices.allocator_relaunch(["train", "--stage", "instruct"], {"PATH": "/bin", "LD_PRELOAD": "libx.so"})
    assert command == [sys.executable, "-m", "cli", "train", "--stage", "instruct"]
    assert env == {"PATH": "/bin", "LD_PRELOAD": "libtcmalloc_minimal.so.4:libx.so"}
    assert devices.allocator_relaunch(["train"], env) is None  # the relaunched process goes on: no loop
    assert devices.allocator_relaunch(["train"], {"LD_PRELOAD": "/opt/libjemalloc.so.2"}) is None  # the user's choice stays
    assert devices.allocator_relaunch(["train"], {"VLM_CHAT_ALLOCATOR": "system"}) is None
    with pytest.raises(ConfigError, match="VLM_CHAT_ALLOCATOR='tcmalloc'; choose one of: auto, system"):
        devices.allocator_relaunch(["train"], {"VLM_CHAT_ALLOCATOR": "tcmalloc"})
    monkeypatch.setattr(devices.sys, "platform", "darwin")
    assert devices.allocator_relaunch(["train"], {}) is None
    monkeypatch.setattr(devices.sys, "platform", "linux")
    monkeypatch.setattr(devices, "fast_allocator", lambda: None)
    assert devices.allocator_relaunch(["train"], {}) is None  # not installed: glibc's malloc, no error


def test_only_training_from_the_console_script_relaunches(monkeypatch, capsys, tmp_path):
    from vlm_chat import devices

    execs = []
    monkeypatch.setattr(os, "execve", lambda *call: execs.append(call))
    monkeypatch.setattr(devices, "fast_allocator", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("VLM_CHAT_ALLOCATOR", raising=False)
    argv = ["train", "--stage", "nonsense"]
    monkeypatch.setattr(sys, "argv", ["vlm-chat", *argv])
    assert main(argv) == 2 and execs == []  # a caller's own process (this test's) is never replaced
    assert main() == 2  # from the console script: execve (stubbed here, so it returns and the command goes on)
    (path, command, env), = execs
    assert (path, command[1:]) == (sys.executable, ["-m", "cli", *argv]) and env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    assert "[allocator] training under libtcmalloc_minimal.so.4" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["vlm-chat", "eval", "--model", str(tmp_path / "none"), "--data", "missing.jsonl"])
    assert main() == 2
    assert len(execs) == 1  # inference commands stay on the system allocator
    monkeypatch.setattr(sys, "argv", ["vlm-chat", *argv])
    monkeypatch.setenv("VLM_CHAT_ALLOCATOR", "jemalloc")
    assert main() == 2 and len(execs) == 1
    assert "VLM_CHAT_ALLOCATOR='jemalloc'; choose one of: auto, system" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_a_training_command_really_runs_again_under_tcmalloc(tmp_path):
    from vlm_chat.devices import allocator_relaunch, fast_allocator

    if fast_allocator() is None:
        pytest.skip("tcmalloc is not installed (scripts/setup.sh installs libtcmalloc-minimal4)")
    env = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", "VLM_CHAT_ALLOCATOR")}
    run = subprocess.run([sys.executable, "-m", "cli", "train", "--stage", "nonsense"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("[allocator] training under") == 1  # relaunched once, not in a loop
    assert "unknown or missing stage 'nonsense'" in run.stderr
    _, preloaded = allocator_relaunch([], env)  # the library name it preloads is one the loader finds
    maps = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"], env=preloaded,
                          capture_output=True, text=True, timeout=60)
    assert "libtcmalloc" in maps.stdout and "cannot be preloaded" not in maps.stderr
